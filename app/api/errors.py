"""The one error envelope and the one table from exception type to HTTP status.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with the
status from `ERROR_TABLE`, found by walking the exception's MRO, so a new engine or adapter error
inherits a sensible status from its base class. The field at fault comes from the exception's
own `param`, never from its message. Only typed errors are a client's fault: anything else
(a bare ValueError included) is a 500, logged here, and a stack trace never reaches a client.
429 and 503 carry `Retry-After`.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters.errors import (
    AdapterCapacityError,
    AdapterError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    RefusedAdapterError,
    UnsafeAdapterError,
)
from adapters.merge import MERGE_METHODS, MergeParameterError, UnknownMergeMethodError
from app.engine.merging import MergeQueueFullError
from app.engine.types import (
    AdapterPlacementError,
    ContextLengthExceededError,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    EngineOverloadedError,
    GenerationError,
    InvalidRequestError,
    RequestCancelledError,
)
from app.protocol import INVALID_VALUE
from router_index.router import RoutingOptionError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A problem the API layer detects itself; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidParameterError(ApiError):
    """A field is present and well-typed but its value is out of range or unsupported."""


class InvalidJSONError(ApiError):
    """The body is not JSON."""


class SchemaError(ApiError):
    """The JSON does not have the request's shape (missing field, wrong type): 400, as OpenAI."""


class UnknownModelError(ApiError):
    """`model` names neither auto, base nor a loaded adapter."""


class AuthenticationError(ApiError):
    """Missing or wrong API key (or admin key)."""


class AdminDisabledError(ApiError):
    """No admin key is configured, so the admin endpoints refuse everyone."""


class AdapterConflictError(ApiError):
    """Registering an adapter id that is already loaded."""


class RequestTooLargeError(ApiError):
    """The body exceeds `settings.max_body_bytes`."""


class RouteNotFoundError(ApiError):
    """No endpoint at this path."""


class MethodNotAllowedError(ApiError):
    """The path exists, not with this method."""

    def __init__(self, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow


class LoadFailedError(ApiError):
    """Loading the base model, adapters or index failed at start-up."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None
    param_prefix: str = ""  # the request object the exception's `param` lives in


_INVALID = "invalid_request_error"

# Most specific first is not needed: lookup walks the raised exception's MRO.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidParameterError: ErrorKind(400, _INVALID, "invalid_parameter"),
    InvalidJSONError: ErrorKind(400, _INVALID, "invalid_json"),
    SchemaError: ErrorKind(400, _INVALID, "invalid_schema"),
    UnknownModelError: ErrorKind(404, _INVALID, "model_not_found"),
    AuthenticationError: ErrorKind(401, "authentication_error", "invalid_api_key"),
    AdminDisabledError: ErrorKind(403, "permission_error", "admin_disabled"),
    AdapterConflictError: ErrorKind(409, _INVALID, "adapter_exists"),
    RequestTooLargeError: ErrorKind(413, _INVALID, "request_too_large"),
    RouteNotFoundError: ErrorKind(404, "not_found_error", "route_not_found"),
    MethodNotAllowedError: ErrorKind(405, _INVALID, "method_not_allowed"),
    LoadFailedError: ErrorKind(500, "server_error", "load_failed"),
    # The engine's typed errors.
    InvalidRequestError: ErrorKind(400, _INVALID, "invalid_parameter"),
    ContextLengthExceededError: ErrorKind(400, _INVALID, "context_length_exceeded"),
    EngineOverloadedError: ErrorKind(429, "rate_limit_error", "overloaded"),
    MergeQueueFullError: ErrorKind(503, "service_unavailable_error", "merge_queue_full"),
    EngineNotReadyError: ErrorKind(503, "service_unavailable_error", "not_ready"),
    EngineDeadError: ErrorKind(503, "service_unavailable_error", "engine_dead"),
    AdapterPlacementError: ErrorKind(503, "service_unavailable_error", "adapter_placement"),
    GenerationError: ErrorKind(500, "server_error", "generation_failed"),
    RequestCancelledError: ErrorKind(503, "service_unavailable_error", "cancelled"),
    EngineError: ErrorKind(400, _INVALID, None),
    # The router's and the merge registry's.
    RoutingOptionError: ErrorKind(400, _INVALID, "invalid_parameter"),
    UnknownMergeMethodError: ErrorKind(400, _INVALID, "unknown_merge_method", "merge."),
    MergeParameterError: ErrorKind(400, _INVALID, "invalid_parameter", "merge."),
    # The adapters'.
    AdapterNotFoundError: ErrorKind(404, "not_found_error", "adapter_not_found"),
    # 409: the adapter exists, but its state (refused at validation) conflicts with serving.
    RefusedAdapterError: ErrorKind(409, _INVALID, "adapter_refused"),
    IncompatibleAdapterError: ErrorKind(400, _INVALID, "incompatible_adapter"),
    UnsafeAdapterError: ErrorKind(400, _INVALID, "unsafe_adapter"),
    AdapterCapacityError: ErrorKind(409, _INVALID, "adapter_capacity"),
    AdapterError: ErrorKind(400, _INVALID, None),
    # nginx's "client closed request": only ever seen in logs and metrics.
    ClientDisconnect: ErrorKind(499, _INVALID, "client_disconnected"),
    Exception: ErrorKind(500, "server_error", "internal_error"),
}


def kind_of(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


# Directories whose names must never reach a client (the store, the checkpoints, the code):
# a message that quotes one (an OSError at load, a dead worker's reason) gets them replaced.
_PRIVATE_ROOTS: set[str] = {
    str(Path(__file__).resolve().parents[2]), str(Path.home()), sys.prefix, tempfile.gettempdir(),
}


def hide_paths(*paths: Path | str | None) -> None:
    """Add directories that error messages must not reveal (create_app passes the settings')."""
    for path in paths:
        if path is not None:
            _PRIVATE_ROOTS.update({str(path), str(Path(path).resolve())})


def _scrubbed(message: str) -> str:
    for root in sorted(_PRIVATE_ROOTS, key=len, reverse=True):
        if len(root) > 1 and root in message:
            message = message.replace(root, "<server path>")
    return message


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and the envelope of `exc` (also used for errors inside an SSE stream)."""
    kind = kind_of(exc)
    if kind.status >= 500 and kind is ERROR_TABLE[Exception]:
        log.error("unhandled error", exc_info=exc)
        message = "internal server error"
    else:
        message = _scrubbed(str(exc) or type(exc).__name__)
    param = getattr(exc, "param", None)
    if param is not None:
        param = kind.param_prefix + param
    return kind.status, {
        "error": {"message": message, "type": kind.type, "param": param, "code": kind.code}
    }


def error_headers(exc: BaseException, status: int) -> dict[str, str]:
    """`WWW-Authenticate` on 401; `Retry-After` (whole seconds) on 429 and 503."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 405 and getattr(exc, "allow", None):
        return {"Allow": exc.allow}  # type: ignore[attr-defined]
    if status in (429, 503):
        return {"Retry-After": str(max(1, math.ceil(getattr(exc, "retry_after_s", 1.0))))}
    return {}


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status, headers=error_headers(exc, status))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names one route's)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods.update(route.methods or ())
    return sorted(methods)


def _from_http_exception(exc: StarletteHTTPException, request: Request) -> BaseException:
    """Starlette's own 404/405/400s, as the table's exceptions."""
    if exc.status_code == 404:
        return RouteNotFoundError(f"no endpoint {request.method} {request.url.path}")
    if exc.status_code == 405:
        return MethodNotAllowedError(
            f"method {request.method} is not allowed on {request.url.path}",
            allow=", ".join(_allowed_methods(request)) or None,
        )
    if exc.status_code == 413:
        return RequestTooLargeError(str(exc.detail))
    if exc.status_code < 500:
        return InvalidParameterError(str(exc.detail))
    return exc


# Pydantic error types that mean "a value out of range or not allowed": OpenAI answers those
# with code invalid_parameter. Everything else (missing field, wrong type, unknown field) is a
# wrong shape, code invalid_schema. Both are 400, as OpenAI answers (clients catch BadRequestError).
_VALUE_ERRORS = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "too_short", "too_long", "string_too_short", "string_too_long", "string_pattern_mismatch",
    "literal_error", "enum", "union_tag_invalid", "finite_number", INVALID_VALUE,
})
_LOCATIONS = frozenset({"body", "path", "query", "header", "cookie"})
_MAP_FIELDS = frozenset({"logit_bias"})  # errors name the map, not one of its keys
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_union_label(part: str) -> bool:
    """pydantic names the union member that failed in `loc` ("str", "list[str]", "TextPart")."""
    return part in _TYPE_LABELS or any(c in part for c in "[(-") or part[:1].isupper()


def _param(error: dict[str, Any]) -> str | None:
    """The request field at fault, dotted as the request spells it ("merge.density")."""
    loc = list(error.get("loc", ()))
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    parts: list[str] = []
    for part in loc:
        if part == "[key]":
            break
        if isinstance(part, str) and _is_union_label(part):
            continue
        if parts and parts[-1] == "merge" and part in MERGE_METHODS:
            continue  # the tag of the merge union is the method, already in `method`
        parts.append(str(part))
        if len(parts) == 1 and part in _MAP_FIELDS:
            break
    if error.get("type") == "union_tag_invalid":
        parts.append("type" if parts and parts[-1] == "response_format" else "method")
    return ".".join(parts) or None


def _from_validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
        return InvalidJSONError(f"the body is not valid JSON: {detail}")
    # A union reports every member: when the value has one member's type but a bad value,
    # the other members' type mismatches say nothing about the request.
    valued = {_param(e) for e in errors if e.get("type") in _VALUE_ERRORS}
    errors = [e for e in errors if not (
        str(e.get("type", "")).endswith("_type") and _param(e) in valued
        and any(isinstance(p, str) and _is_union_label(p) for p in e.get("loc", ())))]
    shape = [e for e in errors if e.get("type") not in _VALUE_ERRORS]
    first = (shape or errors or [{}])[0]
    described = shape or errors
    messages = "; ".join(f"{_param(e) or 'body'}: {e.get('msg')}" for e in described[:5])
    if shape or not errors:
        return SchemaError(messages or "invalid request", param=_param(first))
    return InvalidParameterError(messages, param=_param(first))


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        exc = _from_validation_error(exc)
    elif isinstance(exc, StarletteHTTPException):
        exc = _from_http_exception(exc, request)
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type of the table (and FastAPI's own) through the envelope."""
    for cls in (*ERROR_TABLE, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(cls, _handle)
