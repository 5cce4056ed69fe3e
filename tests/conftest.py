import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("VIBRATO_SHARED_DATA", REPO.parent / "shared" / "data"))


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
