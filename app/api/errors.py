"""The one error envelope and the one table from exception type to HTTP status.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with the
status from `ERROR_TABLE`, found by walking the exception's MRO, so a new engine or adapter error
inherits a sensible status from its base class. Nothing ever answers 200 with an error, and a
stack trace never reaches a client (500s are logged here instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters.errors import (
    AdapterCapacityError,
    AdapterError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    UnsafeAdapterError,
)
from app.engine.types import (
    ContextLengthExceededError,
    EngineError,
    EngineNotReadyError,
    EngineOverloadedError,
)

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
    """The JSON does not have the request's shape (missing field, wrong type)."""


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


class GenerationFailedError(ApiError):
    """The engine reported an error while generating."""


class GenerationCancelledError(ApiError):
    """The engine stopped the request before it finished (shutdown)."""


class LoadFailedError(ApiError):
    """Loading the base model, adapters or index failed at start-up."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


_INVALID = "invalid_request_error"

# Most specific first is not needed: lookup walks the raised exception's MRO.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidParameterError: ErrorKind(400, _INVALID, "invalid_parameter"),
    InvalidJSONError: ErrorKind(400, _INVALID, "invalid_json"),
    SchemaError: ErrorKind(422, _INVALID, "invalid_schema"),
    UnknownModelError: ErrorKind(404, _INVALID, "model_not_found"),
    AuthenticationError: ErrorKind(401, "authentication_error", "invalid_api_key"),
    AdminDisabledError: ErrorKind(403, "permission_error", "admin_disabled"),
    AdapterConflictError: ErrorKind(409, _INVALID, "adapter_exists"),
    RequestTooLargeError: ErrorKind(413, _INVALID, "request_too_large"),
    RouteNotFoundError: ErrorKind(404, "not_found_error", "route_not_found"),
    MethodNotAllowedError: ErrorKind(405, _INVALID, "method_not_allowed"),
    GenerationFailedError: ErrorKind(500, "server_error", "generation_failed"),
    GenerationCancelledError: ErrorKind(503, "service_unavailable_error", "cancelled"),
    LoadFailedError: ErrorKind(500, "server_error", "load_failed"),
    ContextLengthExceededError: ErrorKind(400, _INVALID, "context_length_exceeded"),
    EngineOverloadedError: ErrorKind(429, "rate_limit_error", "overloaded"),
    EngineNotReadyError: ErrorKind(503, "service_unavailable_error", "not_ready"),
    EngineError: ErrorKind(400, _INVALID, None),
    AdapterNotFoundError: ErrorKind(404, "not_found_error", "adapter_not_found"),
    IncompatibleAdapterError: ErrorKind(400, _INVALID, "incompatible_adapter"),
    UnsafeAdapterError: ErrorKind(400, _INVALID, "unsafe_adapter"),
    AdapterCapacityError: ErrorKind(409, _INVALID, "adapter_capacity"),
    AdapterError: ErrorKind(400, _INVALID, None),
    # nginx's "client closed request": only ever seen in logs and metrics.
    ClientDisconnect: ErrorKind(499, _INVALID, "client_disconnected"),
    ValueError: ErrorKind(400, _INVALID, "invalid_value"),
    Exception: ErrorKind(500, "server_error", "internal_error"),
}


def kind_of(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and the envelope of `exc` (also used for errors inside an SSE stream)."""
    kind = kind_of(exc)
    if kind.status >= 500 and kind is ERROR_TABLE[Exception]:
        log.error("unhandled error", exc_info=exc)
        message = "internal server error"
    else:
        message = str(exc) or type(exc).__name__
    param = getattr(exc, "param", None)
    return kind.status, {
        "error": {"message": message, "type": kind.type, "param": param, "code": kind.code}
    }


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _from_http_exception(exc: StarletteHTTPException, request: Request) -> BaseException:
    """Starlette's own 404/405/400s, as the table's exceptions."""
    if exc.status_code == 404:
        return RouteNotFoundError(f"no endpoint {request.method} {request.url.path}")
    if exc.status_code == 405:
        return MethodNotAllowedError(
            f"method {request.method} is not allowed on {request.url.path}"
        )
    if exc.status_code == 413:
        return RequestTooLargeError(str(exc.detail))
    if exc.status_code < 500:
        return InvalidParameterError(str(exc.detail))
    return exc


def _from_validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
        return InvalidJSONError(f"the body is not valid JSON: {detail}")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return SchemaError(messages or "invalid request", param=param)


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
