"""Every runbook script (the gate scripts of CONTRACT.md §6) installs what it needs before it runs,
so it works verbatim on a fresh clone.

Each script is run from a scratch checkout that has no .venv: a stand-in Makefile whose
`install-test` target makes .venv/bin/python (a wrapper around this interpreter, which has vibrato and
the test extra) plays `make install-test`, and the harness each script starts is replaced by a probe
that fails unless it runs under that interpreter with vibrato importable. Before the scripts sourced
scripts/lib/venv.sh they fell back to the system python3 ("unrecognized arguments: --timeout=0",
"No module named 'vibrato'"). CI runs two of them for real on a clone without a .venv (.ci/run).
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# script -> the harness it runs (replaced by the probe)
SCRIPTS = {
    "scripts/ci/run_crash_matrix.sh": "tests/gates/test_crash_matrix.py",
    "scripts/ci/run_api_fuzz.sh": "tests/gates/test_api_fuzz.py",
    "scripts/soak/run_mixed_workload_soak.sh": "tests/gates/test_soak.py",
    "scripts/perf/run_madvise_ab.sh": "perf/bench_madvise_ab.py",
    "scripts/ops/canary_rollback_drill.sh": "scripts/ops/canary_drill.py",
    "scripts/perf/run_stress.sh": "perf/stress_million_ops.py",
}

PROBE = textwrap.dedent("""\
    import os, sys
    import vibrato  # fails under a python without the package
    open(os.path.join(os.getcwd(), "PROBE_RAN"), "w").write(sys.executable)

    def test_probe():
        assert vibrato.__version__
""")

MAKEFILE = textwrap.dedent("""\
    .PHONY: install-test
    install-test: .venv/.installed-test
    .venv/.installed-test:
    \tmkdir -p .venv/bin
    \tprintf '#!/bin/sh\\nexec {python} "$$@"\\n' > .venv/bin/python
    \tchmod +x .venv/bin/python
    \techo installed >> INSTALL_RAN
    \ttouch $@
""")


def make_checkout(tmp_path: Path, script: str, harness: str) -> Path:
    root = tmp_path / "clone"
    for rel in (script, "scripts/lib/venv.sh"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    (root / harness).parent.mkdir(parents=True, exist_ok=True)
    (root / harness).write_text(PROBE)
    (root / "Makefile").write_text(MAKEFILE.format(python=sys.executable))
    return root


def clean_env() -> dict:
    # No virtualenv on PATH: `python3` is whatever the machine has, as on a fresh clone.
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(Path(sys.executable).parent))]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "VIBRATO_SKIP_INSTALL")}
    env.update(PATH=os.pathsep.join(path), VIBRATO_CRASH_SEEDS="1", VIBRATO_SOAK_SECS="1", PYTHONPATH="")
    return env


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_runbook_script_installs_then_runs_on_a_fresh_clone(tmp_path, script):
    root = make_checkout(tmp_path, script, SCRIPTS[script])
    proc = subprocess.run(["bash", script], cwd=root, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "INSTALL_RAN").read_text().count("installed") == 1
    assert (root / "PROBE_RAN").read_text() == sys.executable  # through the .venv wrapper
    # Up to date: the second run installs nothing and prints nothing about installing.
    proc2 = subprocess.run(["bash", script], cwd=root, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    assert (root / "INSTALL_RAN").read_text().count("installed") == 1
    assert "mkdir" not in proc2.stdout + proc2.stderr


def test_install_failure_is_reported_and_stops_the_script(tmp_path):
    script = "scripts/ci/run_crash_matrix.sh"
    root = make_checkout(tmp_path, script, SCRIPTS[script])
    (root / "Makefile").write_text(".PHONY: install-test\ninstall-test:\n\t@echo 'no compiler here' >&2; exit 3\n")
    proc = subprocess.run(["bash", script], cwd=root, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no compiler here" in proc.stderr and "make install-test" in proc.stderr
    assert not (root / "PROBE_RAN").exists()


def test_every_runbook_script_is_covered():
    shell = {str(p.relative_to(REPO)) for p in (REPO / "scripts").rglob("*.sh")
             if "lib" not in p.parts and "smoke" not in p.parts}
    assert shell == set(SCRIPTS), "a new runbook script needs an entry here (and to source scripts/lib/venv.sh)"
