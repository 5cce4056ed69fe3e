"""The operational gates (tests/gates/) are long-running and are NOT part of the default `pytest` run.

They are collected only when a path inside tests/gates is named on the command line (which is what
the gate scripts under scripts/ do), or when VIBRATO_RUN_GATES=1.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _gates_requested(config) -> bool:
    if os.environ.get("VIBRATO_RUN_GATES") == "1":
        return True
    for arg in config.args:
        p = Path(arg.split("::", 1)[0]).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if (collection_path == HERE or HERE in collection_path.parents) and not _gates_requested(config):
        return True
    return None
