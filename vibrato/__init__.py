"""Vibrato: a vector database for audio embeddings."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("vibrato")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
