"""What the routes share: the engine, the keys, and protocol fields turned into engine inputs.

Nothing here computes a route or a blend: it only turns protocol fields into the engine's
`GenerationRequest` / `RoutingOptions` and engine events into protocol pieces.
"""

from __future__ import annotations

import secrets

from fastapi import Request
from pydantic import SecretStr

from adapters.blend import AUTO_MODEL, BASE_MODEL
from app.api.errors import (
    AdminDisabledError,
    AuthenticationError,
    InvalidParameterError,
    UnknownModelError,
)
from app.engine.protocol import EngineClient
from app.engine.types import EngineDeadError, EngineNotReadyError, MergeSpec, SamplingParams
from app.protocol import (
    ChatMessage,
    MergeParams,
    RoutingParams,
    SamplingFields,
)
from app.settings import Settings
from router_index.router import RoutingOptions


# --- state and keys -----------------------------------------------------------------------
def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def ready_engine(request: Request) -> EngineClient:
    """The engine, or a 503 while it loads, drains or after it died."""
    engine = get_engine(request)
    health = engine.health()
    if health == "dead":
        raise EngineDeadError(f"the engine is dead: {engine.stats().dead_reason}")
    if health == "loading":
        raise EngineNotReadyError("the server is still loading; retry shortly")
    if health == "draining":
        raise EngineNotReadyError("the server is shutting down; retry on another replica")
    return engine


def _check_bearer(request: Request, expected: SecretStr, what: str) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(f"missing {what}: send 'Authorization: Bearer <key>'")
    # Constant time: the comparison must not tell how much of a guess was right.
    if not secrets.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise AuthenticationError(f"invalid {what}")


async def require_api_key(request: Request) -> None:
    """Only when `settings.api_key` is set (keys are off by default)."""
    key = get_settings(request).api_key
    if key is not None:
        _check_bearer(request, key, "API key")


async def require_admin_key(request: Request) -> None:
    """Admin endpoints answer 403 to everyone while no admin key is configured."""
    key = get_settings(request).admin_key
    if key is None:
        raise AdminDisabledError("the admin API is disabled; set DYNAMERGE_ADMIN_KEY to enable it")
    _check_bearer(request, key, "admin key")


def adapter_ids(engine: EngineClient) -> list[str]:
    return [m for m in engine.models() if m not in (AUTO_MODEL, BASE_MODEL)]


def note_model(request: Request, engine: EngineClient, model: str) -> None:
    """The `model` label of the request metric (unknown names collapse: bounded cardinality)."""
    request.state.model = model if model in engine.models() else "unknown"


# --- from protocol fields to engine inputs ------------------------------------------------
def check_model(engine: EngineClient, model: str) -> None:
    if model not in engine.models():
        raise UnknownModelError(
            f"model {model!r} does not exist; GET /v1/models lists auto, base and the adapters",
            param="model",
        )


def sampling_params(settings: Settings, body: SamplingFields) -> SamplingParams:
    """The request's sampling fields as the engine's SamplingParams (errors name the field)."""
    if body.max_completion_tokens is not None:
        limit, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        limit, param = body.max_tokens, "max_tokens"
    limit = settings.default_max_tokens if limit is None else limit
    if not 1 <= limit <= settings.max_tokens_limit:
        raise InvalidParameterError(
            f"{param} must be in [1, {settings.max_tokens_limit}], got {limit}", param=param
        )
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=limit,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(s for s in stops if s),
    )


def routing_options(
    engine: EngineClient, model: str, params: RoutingParams | None
) -> RoutingOptions | None:
    """The request's routing overrides (only meaningful for model "auto")."""
    if params is None or model != "auto":
        return None
    return engine.routing_options(**params.model_dump(exclude_none=True))


def merge_spec(engine: EngineClient, params: MergeParams | None) -> MergeSpec:
    """The request's `merge` as the engine's MergeSpec, validated by the engine's registry
    (an unknown method or an out-of-range parameter is a 400 naming it)."""
    if params is None:
        return MergeSpec()
    extra = dict(params.model_extra or {})
    storage, rank = extra.pop("storage", None), extra.pop("rank", None)
    return engine.merge_spec(params.method, extra, storage, rank)


def chat_texts(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str]:
    """Messages as the chat template wants them, and the text the router embeds."""
    if not messages:
        raise InvalidParameterError("messages must not be empty", param="messages")
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    users = [m["content"] for m in rendered if m["role"] == "user"]
    return rendered, users[-1] if users else rendered[-1]["content"]
