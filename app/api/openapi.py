"""The app's OpenAPI document, made to tell the truth about this server.

Routes declare their error statuses with `responses(...)` (the error envelope as schema).
`install_openapi` then writes into the generated document what depends on this app's
settings and engine: the maxima that deps.py enforces (max_tokens_limit, max_n,
max_adapters), the body limit, which key each operation needs (and so whether 401 or 403 can
happen at all), and the embedder's dimension.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.protocol import ErrorResponse
from app.settings import Settings

_DESCRIPTIONS = {
    400: "A value is out of range or not supported (`code` invalid_parameter), the body does "
         "not have the request's shape: wrong type, missing or unknown field (`code` "
         "invalid_schema), or is not JSON (`code` invalid_json); `param` names the field",
    401: "Missing or wrong key",
    403: "The admin API is disabled (no admin key configured)",
    404: "Unknown model, adapter or route",
    409: "The adapter already exists, was refused at validation (the message says why), or "
         "a capacity is exhausted",
    413: "The body is larger than the server accepts",
    422: "The body does not have the request's shape (missing field, wrong type)",
    429: "Too many requests in flight; retry after `Retry-After` seconds",
    500: "Generating failed, or loading the model failed",
    503: "Loading, draining, the engine is dead, or adapters could not be placed in time",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 1}}}
GENERATION_ERRORS = (400, 401, 404, 409, 413, 429, 500, 503)
ADAPTERS_HEADER = "x-dynamerge-adapters"


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Error responses for a route's `responses=`: the envelope, and Retry-After where due."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def generation_200(model: type[BaseModel]) -> dict[str, Any]:
    """A generation's 200: the JSON response, or server-sent events when `stream` is true."""
    return {
        "model": model,
        "description": "The response, or with `stream: true` server-sent events (`data: "
                       "<chunk JSON>` lines, an error event if generation fails midway, then "
                       "`data: [DONE]`)",
        "content": {"text/event-stream": {"schema": {  # one event
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "description": "a chunk as JSON, an "
                                    "error envelope as JSON, or [DONE]"}},
        }}},
        "headers": {ADAPTERS_HEADER: {
            "description": "the blend: `id=weight` pairs, comma-separated, or `base`",
            "schema": {"type": "string"}}},
    }


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for operation in item.values():
            yield path, operation


def _set_maximum(schema: dict[str, Any], maximum: int) -> None:
    """`maximum` on an integer schema, or on the integer branch of `anyOf: [int, null]`."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = min(maximum, branch.get("maximum", maximum))


def _patch(doc: dict[str, Any], settings: Settings, embedding_dim: int | None) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    for schema in schemas.values():
        props = schema.get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                _set_maximum(props[name], settings.max_tokens_limit)
        if "n" in props and "model" in props:
            _set_maximum(props["n"], settings.max_n)
        if "top_k" in props and "threshold" in props:  # RoutingParams
            _set_maximum(props["top_k"], settings.max_adapters)
        if "dimensions" in props and embedding_dim is not None:
            for branch in props["dimensions"].get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["enum"] = [embedding_dim]
    # FastAPI's own 422 shape is never sent: our 422 is the envelope.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)

    user, admin = settings.api_key is not None, settings.admin_key is not None
    security: dict[str, Any] = {}
    if user:
        security["apiKey"] = {"type": "http", "scheme": "bearer",
                              "description": "DYNAMERGE_API_KEY"}
    if admin:
        security["adminKey"] = {"type": "http", "scheme": "bearer",
                                "description": "DYNAMERGE_ADMIN_KEY"}
    if security:
        doc.setdefault("components", {})["securitySchemes"] = security
    for path, operation in _operations(doc):
        codes = operation.setdefault("responses", {})
        if "HTTPValidationError" in str(codes.get("422", "")):
            del codes["422"]  # FastAPI's default where nothing can fail validation
        if "413" in codes:
            codes["413"]["description"] += f" ({settings.max_body_bytes} bytes)"
        if path.startswith("/v1/adapters"):
            if admin:
                operation["security"] = [{"adminKey": []}]
                codes.pop("403", None)
            else:  # every request is refused: 403 is all these operations can answer
                codes.pop("401", None)
        elif path.startswith("/v1/"):
            if user:
                operation["security"] = [{"apiKey": []}]
            else:
                codes.pop("401", None)
        if "401" in codes:
            codes["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}


def _link(doc: dict[str, Any]) -> None:
    """OpenAPI links of the adapter lifecycle: a registered adapter can be used as a model
    and deleted; a deleted one can be registered again (and is then a 404 as a model)."""
    paths = doc.get("paths", {})
    try:
        register = paths["/v1/adapters"]["post"]
        delete = paths["/v1/adapters/{adapter_id}"]["delete"]
        chat = paths["/v1/chat/completions"]["post"]
    except KeyError:
        return
    use = {"operationId": chat["operationId"], "requestBody": {"model": "$response.body#/id"},
           "description": "chat with the adapter as the model"}
    register["responses"]["201"]["links"] = {
        "UseAdapter": use,
        "DeleteAdapter": {"operationId": delete["operationId"],
                          "parameters": {"adapter_id": "$response.body#/id"}},
    }
    delete["responses"]["200"]["links"] = {
        "UseDeletedAdapter": {**use, "description": "a deleted adapter is a 404 as a model"},
        "RegisterAgain": {"operationId": register["operationId"],
                          "requestBody": {"id": "$response.body#/id"}},
    }


def install_openapi(app: FastAPI, settings: Settings, embedding_dim: Callable[[], int | None]
                    ) -> None:
    """Replace `app.openapi` with the patched document (cached once the engine is ready,
    `embedding_dim` returning None until then)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" in cache:
            return cache["doc"]
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description=app.description)
        dim = embedding_dim()
        _patch(doc, settings, dim)
        _link(doc)
        if dim is not None:
            cache["doc"] = doc
        return copy.deepcopy(doc) if dim is None else doc

    app.openapi = openapi  # type: ignore[method-assign]
