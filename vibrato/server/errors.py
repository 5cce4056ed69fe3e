"""HTTP-level errors (all `VibratoError`s, so one error middleware turns every one into JSON).

Codes are stable snake_case; messages name the field, the bad value and the limit.
"""
from vibrato.errors import BadRequestError, VibratoError

__all__ = ["BadRequestError", "ExpectationFailedError", "InvalidJsonError", "MethodNotAllowedError",
           "NotFoundRouteError", "PayloadTooLargeError", "RequestTimeoutError", "UnsupportedMediaTypeError",
           "ValidationError", "error_body"]


class ValidationError(VibratoError):
    """Valid JSON of the wrong shape: a missing/unknown field, a wrong type, null, a bad integer (422)."""
    code = "validation_error"
    status = 422


class InvalidJsonError(VibratoError):
    """The body is not valid JSON (400)."""
    code = "invalid_json"
    status = 400


class PayloadTooLargeError(VibratoError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaTypeError(VibratoError):
    code = "unsupported_media_type"
    status = 415


class RequestTimeoutError(VibratoError):
    """The request body did not arrive within --body-timeout-secs (408; the connection is closed)."""
    code = "request_timeout"
    status = 408


class ExpectationFailedError(VibratoError):
    """An `Expect` header other than 100-continue (417)."""
    code = "expectation_failed"
    status = 417


class NotFoundRouteError(VibratoError):
    code = "not_found"
    status = 404


class MethodNotAllowedError(VibratoError):
    code = "method_not_allowed"
    status = 405


def error_body(code: str, message: str) -> dict:
    return {"code": code, "message": message}
