"""Named fault points for crash and fault-injection tests.

Production code calls `fault_point("checkpoint:renamed")` between durable steps. Nothing happens
unless a test armed it, either in-process (`arm(name, exc)`) or in a child process through the
environment: VIBRATO_FAULT="checkpoint:renamed=kill" (SIGKILL self) or "...=raise" (IOError).
Several points may be given, comma-separated.
"""
import os
import signal

_armed: dict = {}


def _from_env() -> dict:
    spec = os.environ.get("VIBRATO_FAULT", "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = part.partition("=")
        out[name] = action or "raise"
    return out


_env = _from_env()


def arm(name: str, exc: BaseException | None = None):
    """Make fault_point(name) raise `exc` (default OSError) once."""
    _armed[name] = exc if exc is not None else OSError(28, f"injected fault at {name}")


def disarm_all():
    _armed.clear()


def fault_point(name: str):
    if name in _armed:
        raise _armed.pop(name)
    action = _env.get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise OSError(5, f"injected fault at {name}")
