"""What the routes share: the engine, the keys, and protocol fields turned into engine inputs.

Nothing here computes a route or a blend: it only turns protocol fields into the engine's
`GenerationRequest` / `RoutingOptions` and engine events into protocol pieces.
"""

from __future__ import annotations

import re
import secrets

from fastapi import Request
from pydantic import SecretStr

from adapters.blend import AUTO_MODEL, BASE_MODEL
from adapters.merge import UnknownMergeMethodError
from app.api.errors import (
    AdminDisabledError,
    AuthenticationError,
    InvalidParameterError,
    UnknownModelError,
)
from app.engine.engine import Engine
from app.engine.types import EngineNotReadyError, MergeSpec, SamplingParams
from app.protocol import (
    ChatMessage,
    MergeParams,
    RoutingParams,
    SamplingFields,
)
from app.settings import Settings
from router_index.router import RoutingOptions


# --- state and keys -----------------------------------------------------------------------
def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def ready_engine(request: Request) -> Engine:
    """The engine, or a 503 while it loads or drains."""
    engine = get_engine(request)
    if not engine.ready:
        raise EngineNotReadyError("the server is still loading; retry shortly")
    if engine.draining:
        raise EngineNotReadyError("the server is shutting down; retry on another replica")
    return engine


def _check_bearer(request: Request, expected: SecretStr, what: str) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(f"missing {what}: send 'Authorization: Bearer <key>'")
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


def adapter_ids(engine: Engine) -> list[str]:
    return [m for m in engine.models() if m not in (AUTO_MODEL, BASE_MODEL)]


def note_model(request: Request, engine: Engine, model: str) -> None:
    """The `model` label of the request metric (unknown names collapse: bounded cardinality)."""
    request.state.model = model if model in engine.models() else "unknown"


# --- from protocol fields to engine inputs ------------------------------------------------
def check_model(engine: Engine, model: str) -> None:
    if model not in engine.models():
        raise UnknownModelError(
            f"model {model!r} does not exist; GET /v1/models lists auto, base and the adapters",
            param="model",
        )


def _param_of(exc: ValueError) -> str | None:
    # The engine's validation messages start with the field's name ("top_p must be ...").
    words = str(exc).split()
    return words[0] if words else None


def sampling_params(settings: Settings, body: SamplingFields) -> SamplingParams:
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
    try:
        return SamplingParams(
            max_tokens=limit,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=tuple(s for s in stops if s),
        )
    except ValueError as exc:
        raise InvalidParameterError(str(exc), param=_param_of(exc)) from exc


def routing_options(
    engine: Engine, model: str, params: RoutingParams | None
) -> RoutingOptions | None:
    """The request's routing overrides (only meaningful for model "auto")."""
    if params is None or model != "auto":
        return None
    fields = params.model_dump(exclude_none=True)
    if "adapters" in fields:
        unknown = [a for a in fields["adapters"] if a not in adapter_ids(engine)]
        if unknown:
            raise UnknownModelError(
                f"routing.adapters names adapters that are not loaded: {unknown}",
                param="routing.adapters",
            )
        fields["adapters"] = tuple(fields["adapters"])
    try:
        return engine.router.options(**fields)
    except ValueError as exc:
        raise InvalidParameterError(str(exc), param=_param_of(exc)) from exc


def merge_spec(engine: Engine, params: MergeParams | None) -> MergeSpec:
    """The request's `merge` as the engine's MergeSpec, validated by the engine's registry
    (an unknown method or an out-of-range parameter is a 400 naming it)."""
    if params is None:
        return MergeSpec()
    extra = dict(params.model_extra or {})
    storage, rank = extra.pop("storage", None), extra.pop("rank", None)
    spec = MergeSpec(method=params.method, params=tuple(sorted(extra.items())),
                     storage=storage, rank=rank)
    if not spec.is_linear or extra or storage is not None or rank is not None:
        try:
            engine.merging.options(spec)
        except UnknownMergeMethodError as exc:
            raise InvalidParameterError(str(exc), param="merge.method") from exc
        except ValueError as exc:
            raise InvalidParameterError(f"merge: {exc}", param=_merge_param(exc, extra)) from exc
    return spec


def _merge_param(exc: ValueError, given: dict[str, object]) -> str:
    """The merge field an error is about: the first given parameter its message names."""
    message = str(exc)
    for name in [*given, "storage", "rank"]:
        if re.search(rf"\b{re.escape(name)}\b", message):
            return f"merge.{name}"
    return "merge"


def chat_texts(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str]:
    """Messages as the chat template wants them, and the text the router embeds."""
    if not messages:
        raise InvalidParameterError("messages must not be empty", param="messages")
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    users = [m["content"] for m in rendered if m["role"] == "user"]
    return rendered, users[-1] if users else rendered[-1]["content"]


