"""The storage engine (see docs/ENGINE_API.md)."""
from vibrato.engine.core import Engine
from vibrato.engine.snapshot import finish_interrupted_restore, replay_to_lsn, snapshot_create, snapshot_restore

__all__ = ["Engine", "snapshot_create", "snapshot_restore", "replay_to_lsn", "finish_interrupted_restore"]
