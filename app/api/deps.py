"""What the routes share: the engine, the keys, and protocol fields turned into engine inputs.

Nothing here computes a route or a blend: it only turns protocol fields into the engine's
`GenerationRequest` / `RoutingOptions` and engine events into protocol pieces.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Request
from pydantic import BaseModel, SecretStr

from adapters.errors import RefusedAdapterError
from app.api.errors import (
    AdminDisabledError,
    AuthenticationError,
    InvalidParameterError,
    UnknownModelError,
)
from app.engine.blend import AUTO_MODEL, BASE_MODEL
from app.engine.protocol import EngineClient
from app.engine.types import EngineDeadError, EngineNotReadyError, MergeSpec, SamplingParams
from app.protocol import (
    ChatCompletionRequest,
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
        refused = {r.id: r.reason for r in engine.refused_adapters()}
        if model in refused:
            raise RefusedAdapterError(f"adapter {model!r} is in the store but was refused: "
                                      f"{refused[model]}", param="model")
        raise UnknownModelError(
            f"model {model!r} does not exist; GET /v1/models lists auto, base and the adapters",
            param="model",
        )


GREEDY_BELOW = 1e-5  # temperatures below this are greedy decoding


def sampling_params(settings: Settings, body: SamplingFields) -> SamplingParams:
    """The request's sampling fields as the engine's SamplingParams (errors name the field)."""
    echo = body.prompt_logprob_count() is not None
    least = 0 if echo else 1  # 0: only the echoed prompt's logprobs (lm-eval's loglikelihood)
    for param in ("max_tokens", "max_completion_tokens"):  # both checked, even if both given
        value = getattr(body, param)
        if value is not None and not least <= value <= settings.max_tokens_limit:
            raise InvalidParameterError(
                f"{param} must be in [{least}, {settings.max_tokens_limit}], got {value}"
                + ("" if echo or value != 0 else " (0 only with echo: true)"), param=param
            )
    limit = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                 settings.default_max_tokens)
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:  # its limit; dividing logits by it overflows (as vLLM)
        temperature = 0.0
    return SamplingParams(
        max_tokens=limit,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(s for s in stops if s),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in (body.logit_bias or {}).items())),
        logprobs=body.logprob_count(),
        json_object=body.json_object,
        prompt_logprobs=body.prompt_logprob_count(),
    )


def check_n(settings: Settings, n: int) -> None:
    if not 1 <= n <= settings.max_n:
        raise InvalidParameterError(f"n must be in [1, {settings.max_n}], got {n}", param="n")


def routing_options(
    settings: Settings, engine: EngineClient, model: str, params: RoutingParams | None
) -> RoutingOptions | None:
    """The request's routing overrides (only meaningful for model "auto")."""
    if params is None or model != "auto":
        return None
    if params.top_k is not None and params.top_k > settings.max_adapters:
        raise InvalidParameterError(
            f"routing.top_k must be in [1, {settings.max_adapters}] (the device's adapter "
            f"slots), got {params.top_k}", param="routing.top_k")
    return engine.routing_options(**params.model_dump(exclude_none=True))


def merge_spec(engine: EngineClient, params: MergeParams | None) -> MergeSpec:
    """The request's `merge` as the engine's MergeSpec, validated by the engine's registry
    (unset parameters take the registry's defaults)."""
    if params is None:
        return MergeSpec()
    values = params.model_dump(exclude_none=True, exclude={"method", "storage", "rank"})
    return engine.merge_spec(params.method, values, params.storage, params.rank)


# --- fields we cannot honour --------------------------------------------------------------
def _absent(value: object) -> bool:
    return value is None or value == [] or value == {}


# field -> (accepted value?, why the others are refused). A field not here is either honoured
# (declared in app/protocol.py) or unknown to OpenAI's API and ignored.
UNSUPPORTED: dict[str, tuple[Callable[[object], bool], str]] = {
    "tools": (_absent, "the model cannot call tools"),
    "tool_choice": (lambda v: v in (None, "none"), "the model cannot call tools; only 'none'"),
    "functions": (_absent, "the model cannot call functions"),
    "function_call": (lambda v: v in (None, "none"), "the model cannot call functions"),
    "audio": (_absent, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "prediction": (_absent, "predicted outputs are not supported"),
    "web_search_options": (_absent, "web search is not supported"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "one tier only: auto/default"),
    "store": (lambda v: v in (None, False), "completions are not stored"),
    "metadata": (_absent, "metadata is only kept with stored completions, which this server "
                 "does not store"),
    "reasoning_effort": (_absent, "the model has no reasoning mode"),
    "verbosity": (_absent, "verbosity is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion) is not supported"),
    # vLLM's sampling extensions, which clients pass through extra_body.
    "top_k": (_absent, "top-k sampling is not supported (routing.top_k sets the adapters)"),
    "min_p": (_absent, "min-p sampling is not supported"),
    "repetition_penalty": (_absent, "use presence_penalty / frequency_penalty"),
    "guided_json": (_absent, 'use response_format {"type": "json_object"}'),
    "guided_regex": (_absent, "guided decoding is not supported"),
    "guided_choice": (_absent, "guided decoding is not supported"),
    "guided_grammar": (_absent, "guided decoding is not supported"),
}


def refuse_unsupported(body: BaseModel, n: int = 1) -> None:
    """A 400 naming the first field the request sets that this server cannot honour."""
    extra = body.model_extra or {}
    for name, (accepted, why) in UNSUPPORTED.items():
        if name in extra and not accepted(extra[name]):
            raise InvalidParameterError(f"{name} is not supported: {why}", param=name)
    best_of = extra.get("best_of")
    if best_of not in (None, 1, n):
        raise InvalidParameterError("best_of is not supported (only 1, or equal to n)",
                                    param="best_of")


def check_logprobs(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameterError("top_logprobs needs logprobs: true", param="top_logprobs")


def chat_texts(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str]:
    """Messages as the chat template wants them, and the text the router embeds."""
    if not messages:
        raise InvalidParameterError("messages must not be empty", param="messages")
    # The chat template knows system, user and assistant; developer is OpenAI's new system.
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in messages]
    users = [m["content"] for m in rendered if m["role"] == "user"]
    return rendered, users[-1] if users else rendered[-1]["content"]
