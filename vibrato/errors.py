"""Typed errors shared by every layer.

Each error carries a stable snake_case ``code`` and the HTTP ``status`` the server answers with
(modelled on aiohttp-demos' AdminRESTError). Messages name the field, the bad value and the limit.
"""


class VibratoError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequestError(VibratoError):
    """The request is well-formed JSON but its values are unacceptable (400)."""
    code = "bad_request"
    status = 400


class ConflictError(VibratoError):
    """An idempotency key was reused with a different payload (409)."""
    code = "conflict"
    status = 409


class NotReadyError(VibratoError):
    """The engine is still recovering (503)."""
    code = "not_ready"
    status = 503


class BackpressureError(VibratoError):
    """Ingest must wait: the hot tier is at its bound until a checkpoint drains it (429, with
    `retry_after` seconds for the Retry-After header; nothing was written)."""
    code = "ingest_backpressure"
    status = 429

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class CatalogReadTimeout(VibratoError):
    """A catalog read exceeded --catalog-read-timeout-ms (503)."""
    code = "catalog_read_timeout"
    status = 503


class StorageError(VibratoError):
    """The catalog or a segment file failed underneath a request (500)."""
    code = "storage_error"
    status = 500


class IntegrityError(VibratoError):
    """Stored state violates an invariant (overlapping id ranges, a checksum mismatch, ...)."""
    code = "integrity_error"
    status = 500


class DataDirLockedError(VibratoError):
    """Another process holds the data directory."""
    code = "data_dir_locked"
    status = 500


class NotFoundError(VibratoError):
    code = "not_found"
    status = 404
