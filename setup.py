"""Build the Cython extensions under vibrato/_native against the C headers in include/.

Optimisation is on (-O3); no -march flags: each SIMD kernel carries its own target attribute and is
picked at run time, so one build runs on any x86-64 (and aarch64 with NEON).
VIBRATO_DEBUG_CYTHON=1 turns bounds/wraparound/initialisation checks back on (CI runs the suite with
it once), as scikit-learn's SKLEARN_ENABLE_DEBUG_CYTHON_DIRECTIVES does.
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("VIBRATO_DEBUG_CYTHON", "") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wno-unused-function", "-pthread"]
if DEBUG:
    compile_args = ["-O1", "-g", "-std=gnu11", "-Wno-unused-function", "-pthread"]
link_args = ["-pthread"]

MODULES = ["cpu", "distance", "pq", "hnsw", "segio", "rows", "httpq"]
# VIBRATO_BUILD_ONLY=hnsw,pq rebuilds just those modules in place (developer convenience).
ONLY = [m for m in os.environ.get("VIBRATO_BUILD_ONLY", "").split(",") if m]


def ext(name):
    return Extension(
        f"vibrato._native.{name}",
        [f"vibrato/_native/{name}.pyx"],
        include_dirs=["include", np.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [ext(m) for m in MODULES
              if os.path.exists(f"vibrato/_native/{m}.pyx") and (not ONLY or m in ONLY)]

# Debug builds generate their C into a separate directory, so a later release build never reuses
# C code generated with the checks turned on.
setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, nthreads=os.cpu_count() or 1,
                          force=DEBUG, build_dir="build/cython-debug" if DEBUG else None),
)
