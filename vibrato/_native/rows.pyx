"""Vectors parsed from JSON (lists of Python numbers) into one float32 array, in one pass.

numpy's `np.array(rows)` discovers the dtype and shape element by element, and the server must also
check that no element is a boolean (numpy would take True as 1.0): ~5 us for one 128-d query vector,
~5 ms for a 1,000-vector batch, all of it holding the GIL. Here each element's exact type is
checked and converted in C.
"""
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_SIZE

import numpy as np

cdef extern from "Python.h":
    bint PyFloat_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1

# Integers up to 2**53 convert to double exactly, so int -> double -> float32 rounds once, as
# numpy's int64 -> float32 does. Larger ones are left to the caller's general path.
cdef long long _EXACT_INT = 1LL << 53


def float32_rows(rows, Py_ssize_t dim):
    """rows: a list of lists of exactly `dim` elements, each an int or a float (bools and everything else
    excluded), as a C-contiguous float32 (len(rows), dim) array converted as numpy converts them
    (values beyond float32's range become +-inf, like numpy's cast). None when any row or element is
    not like that (another type, another length, an integer beyond 2**53): the caller's general path
    then converts it or names what is wrong."""
    if type(rows) is not list:
        return None
    cdef Py_ssize_t n = len(<list>rows), i, j
    cdef int overflow = 0
    cdef long long v
    out = np.empty((n, dim), dtype=np.float32)
    if n == 0 or dim == 0:
        return out
    cdef float[:, ::1] o = out
    cdef list row
    for i in range(n):
        r = (<list>rows)[i]
        if type(r) is not list:
            return None
        row = <list>r
        if PyList_GET_SIZE(row) != dim:
            return None
        for j in range(dim):
            x = row[j]
            if PyFloat_CheckExact(x):
                o[i, j] = <float>PyFloat_AS_DOUBLE(x)
            elif PyLong_CheckExact(x):
                v = PyLong_AsLongLongAndOverflow(x, &overflow)
                if overflow or v > _EXACT_INT or v < -_EXACT_INT:
                    return None
                o[i, j] = <float><double>v
            else:
                return None
    return out
