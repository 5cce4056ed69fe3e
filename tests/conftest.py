import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

def _find_shared_data() -> Path:
    """The shared data sets: $VIBRATO_SHARED_DATA, else ../shared/data next to the checkout, else
    /work/shared/data (where CI's clean clone may live elsewhere)."""
    candidates = [os.environ.get("VIBRATO_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "text" / "base_128.npy").exists():
            return Path(c)
    return Path(candidates[1])


DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data():
    """The shared embedding data sets (text, audio); skips cleanly where they are absent."""
    if not (DATA / "text" / "base_128.npy").exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
