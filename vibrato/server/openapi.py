"""`GET /v2/openapi.json`: the OpenAPI 3.1 description of every route.

Request schemas come from `vibrato.server.schemas` (the same objects that validate requests);
response schemas are declared here. `build(routes)` is called by `create_app` with the route
table, so a route cannot exist without being documented (tests check both directions).
"""
import dataclasses
import re

from vibrato import __version__
from vibrato.engine.validation import U64_MAX
from vibrato.server.schemas import REQUEST_BODIES

_INT = {"type": "integer", "minimum": 0}
_F32_OUT = {"anyOf": [{"type": "number"}, {"type": "null"}], "description": "float32; NaN/inf as null"}

_METADATA_OUT = {
    "type": "object",
    "properties": {"source_file": {"type": "string"}, "start_time_ms": _INT, "duration_ms": _INT, "bpm": _F32_OUT,
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["source_file", "start_time_ms", "duration_ms", "bpm", "tags"],
    "additionalProperties": False,
}


def _data(schema: dict) -> dict:
    return {"type": "object", "properties": {"data": schema}, "required": ["data"], "additionalProperties": False}


def _obj(props: dict, required=None, additional=False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": additional}


STATS_FIELDS = ("ready", "live", "active_segments", "obsolete_segments", "failed_segments", "hot_vectors",
                "wal_pending", "total_vectors", "checkpoint_jobs_inflight", "compaction_jobs_inflight",
                "sqlite_wal_bytes", "catalog_read_timeout_total", "quarantine_files", "quarantine_bytes",
                "quarantine_evictions_total")

RESPONSES = {
    "Error": _obj({"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}, "message": {"type": "string"}}),
    "IngestResponse": _data(_obj({"id": _INT, "created": {"type": "boolean"}})),
    "BatchIngestResponse": _data(_obj({"results": {"type": "array", "items": _obj(
        {"id": _INT, "created": {"type": "boolean"}})}})),
    "QueryResponse": _data(_obj({
        "results": {"type": "array", "items": _obj(
            {"id": _INT, "score": _F32_OUT, "metadata": _METADATA_OUT}, required=["id", "score"])},
        "query_time_ms": {"type": "number", "minimum": 0}})),
    "IdentifyResponse": _data(_obj({
        "results": {"type": "array", "items": _obj(
            {"id": _INT, "start_timestamp_ms": _INT, "duration_ms": _INT, "score": _F32_OUT,
             "metadata": _METADATA_OUT}, required=["id", "start_timestamp_ms", "duration_ms", "score"])},
        "query_time_ms": {"type": "number", "minimum": 0}})),
    "HealthResponse": _data(_obj({"status": {"type": "string", "enum": ["ok", "degraded"]},
                                  "ready": {"type": "boolean"}, "report": {"type": "string"}})),
    "DeleteResponse": _data(_obj({
        "deleted": {**_INT, "description": "rows deleted by this call (unknown or already deleted ids count 0)"},
        "lsn": {"anyOf": [_INT, {"type": "null"}], "description": "the delete's lsn; null when nothing was deleted"}})),
    "JobResponse": _data(_obj({"job_id": {"type": "string", "pattern": "^(chk|cmp|snap|prg)_[0-9]+_[0-9a-f]{16}$"},
                               "state": {"type": "string", "enum": ["idle", "completed"]},
                               "details": {"type": "object"}})),
    "StatsResponse": _data(_obj({**{f: ({"type": "boolean"} if f in ("ready", "live") else _INT)
                                    for f in STATS_FIELDS},
                                 "deleted_vectors": {**_INT, "description": "ids deleted (never served again)"},
                                 "delete_vectors_total": {**_INT, "description": "rows deleted since start"}},
                                required=list(STATS_FIELDS), additional=True)),
    "OpenApiResponse": {"type": "object", "required": ["openapi", "paths"]},
}

_ERROR_STATUSES = {
    "400": "bad_request / invalid_json: bad values (non-finite numbers, dimension mismatch, limits)",
    "401": "missing_authorization / invalid_authorization",
    "403": "forbidden: revoked key or missing role",
    "413": "payload_too_large: body above --max-body-bytes",
    "415": "unsupported_media_type: Content-Type is not JSON",
    "422": "validation_error: wrong shape (unknown/missing field, wrong type, null, bad integer)",
    "500": "internal or backend failure",
    "503": "not_ready (recovering) or catalog_read_timeout",
}


def _fix_vector_length(node, dim: int):
    """Every vector schema (an array of floats) gets minItems = maxItems = the collection's dim."""
    if isinstance(node, dict):
        items = node.get("items")
        if node.get("type") == "array" and isinstance(items, dict) and items.get("format") == "float":
            node.update(minItems=dim, maxItems=dim)
        for v in node.values():
            _fix_vector_length(v, dim)
    elif isinstance(node, list):
        for v in node:
            _fix_vector_length(v, dim)


class _Defaults(dict):
    """format_map source: a limit's configured value, or its name when no Limits were given."""

    def __missing__(self, key):
        return key


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")


def _operation_id(r) -> str:
    """The route's audit action, made unique when two routes share one (delete by body and by path)."""
    params = _PATH_PARAM.findall(r.path)
    return r.policy.action + "".join(f"_by_{p}" for p in params)


def build(routes, dim: int | None = None, limits=None) -> dict:
    """routes: iterable of Route (method, path, policy, summary, request, responses{status: schema},
    body_optional, description). limits: the Limits whose values fill the descriptions' {names}."""
    paths = {}
    values = dataclasses.asdict(limits) if limits is not None else {}
    for r in routes:
        op = {"operationId": _operation_id(r), "summary": r.summary, "responses": {}}
        role = r.policy.role
        notes = []
        if role is not None:
            op["security"] = [{"bearer": []}]
            note = f"Requires role `{role}` (admin passes every role check)."
            if r.policy.public_when_flag:
                note = f"Public with --public-health-metrics true (the default); otherwise requires role `{role}`."
                op["security"] = [{}, {"bearer": []}]
            notes.append(note)
        if r.description:
            notes.append(r.description.format_map(_Defaults(values)))
        if notes:
            op["description"] = " ".join(notes)
        params = _PATH_PARAM.findall(r.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "integer", "minimum": 0, "maximum": U64_MAX}} for p in params]
        if r.request:
            op["requestBody"] = {"required": not r.body_optional,
                                 "content": {"application/json": {"schema": _ref(r.request)}}}
        for status, schema in r.responses.items():
            if schema == "backpressure":  # CONTRACT.md D41
                op["responses"][status] = {
                    "description": "ingest_backpressure: the hot tier is at --hot-max-rows and no checkpoint made "
                                   "room within --ingest-backpressure-wait-secs; nothing was written, retry after "
                                   "Retry-After seconds (vibrato.client does)",
                    "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                "description": "seconds to wait before retrying"}},
                    "content": {"application/json": {"schema": _ref("Error")}}}
            elif schema == "text":
                op["responses"][status] = {"description": "Prometheus text exposition (version 0.0.4)",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}
            else:
                op["responses"][status] = {"description": schema,
                                           "content": {"application/json": {"schema": _ref(schema)}}}
        for status, text in _ERROR_STATUSES.items():
            if status in op["responses"]:
                continue
            if status in ("413", "415", "422") and not r.request:
                continue
            if status in ("401", "403") and role is None:
                continue
            op["responses"][status] = {"description": text,
                                       "content": {"application/json": {"schema": _ref("Error")}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    schemas = {name: spec.json_schema() for name, spec in REQUEST_BODIES.items()}
    if dim is not None:
        _fix_vector_length(schemas, dim)
    schemas.update(RESPONSES)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Vibrato v2 API", "version": __version__,
                 "description": "Vector database for audio embeddings. Success bodies are {\"data\": ...}; "
                                "errors are {\"code\", \"message\"}; every response carries x-request-id."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "vbk_<secs><24hex>.<48hex>"}}},
    }
