"""What the routes share: the engine, the keys, and the way from a parsed request to engine
streams and back (admission off the event loop, n streams merged, cancellation).

Nothing here computes a route or a blend: it only turns protocol fields into the engine's
`GenerationRequest` / `RoutingOptions` and engine events into protocol pieces.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from adapters.blend import AUTO_MODEL, BASE_MODEL
from app.api.errors import (
    AdminDisabledError,
    AuthenticationError,
    GenerationCancelledError,
    GenerationFailedError,
    InvalidParameterError,
    UnknownModelError,
)
from app.engine.engine import Engine
from app.engine.stream import GenerationStream
from app.engine.types import EngineNotReadyError, GenerationRequest, SamplingParams, TokenEvent
from app.protocol import (
    AdapterWeight,
    ChatMessage,
    MergeParams,
    RoutingInfo,
    RoutingParams,
    SamplingFields,
    Usage,
)
from app.settings import Settings
from router_index.router import RoutingOptions

# Merge methods served, with the extra parameters each accepts. The engine blends in
# activation space, which is Eq. 9 (linear task arithmetic) exactly; methods of
# adapters/merge join this registry once the engine builds virtual adapters from them.
MERGE_METHODS: dict[str, frozenset[str]] = {"linear": frozenset()}
# The engine's finish reasons that complete a request; the others become table errors.
_FINISH_REASONS = {"stop": "stop", "length": "length"}
ADAPTERS_HEADER = "x-dynamerge-adapters"


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


def merge_method(params: MergeParams | None) -> str:
    """The merge method's name, after checking it is served and its parameters are its own."""
    if params is None:
        return "linear"
    if params.method not in MERGE_METHODS:
        raise InvalidParameterError(
            f"merge.method {params.method!r} is not available; valid methods: "
            f"{', '.join(MERGE_METHODS)}",
            param="merge.method",
        )
    unknown = sorted(set(params.model_extra or {}) - MERGE_METHODS[params.method])
    if unknown:
        raise InvalidParameterError(
            f"merge method {params.method!r} takes no parameter(s) {unknown}",
            param=f"merge.{unknown[0]}",
        )
    return params.method


def chat_texts(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], str]:
    """Messages as the chat template wants them, and the text the router embeds."""
    if not messages:
        raise InvalidParameterError("messages must not be empty", param="messages")
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    users = [m["content"] for m in rendered if m["role"] == "user"]
    return rendered, users[-1] if users else rendered[-1]["content"]


# --- running requests ---------------------------------------------------------------------
def _submit_all(
    engine: Engine, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop
) -> list[GenerationStream]:
    streams: list[GenerationStream] = []
    try:
        for request in requests:
            streams.append(engine.submit(request, loop))
    except BaseException:
        for stream in streams:  # all n or none: a 429 on the third must not orphan two
            stream.cancel()
        raise
    return streams


class Run:
    """The engine streams of one HTTP request (prompts x n, prompt-major) and their blend."""

    def __init__(self, streams: list[GenerationStream], method: str, n: int) -> None:
        self.streams = streams
        self.method = method
        self.n = n
        self.finals: list[TokenEvent | None] = [None] * len(streams)

    @classmethod
    async def start(
        cls, engine: Engine, requests: list[GenerationRequest], method: str, n: int
    ) -> Run:
        """Admit every request; routing and admission run in a worker thread, off the loop."""
        loop = asyncio.get_running_loop()
        return cls(await run_in_threadpool(_submit_all, engine, requests, loop), method, n)

    def routing(self, i: int = 0) -> RoutingInfo:
        admission = self.streams[i].admission
        scores = admission.decision.scores if admission.decision is not None else {}
        return RoutingInfo(
            adapters=[AdapterWeight(id=a, score=scores.get(a), weight=w)
                      for a, w in admission.blend],
            method=self.method,
            fallback=admission.decision is not None and admission.decision.fallback,
            cache_hit=False,  # linear blending needs no merged virtual adapter to cache
        )

    def headers(self) -> dict[str, str]:
        blend = self.streams[0].admission.blend
        return {ADAPTERS_HEADER: ",".join(f"{a}={w:.3f}" for a, w in blend) or "base"}

    def usage(self) -> Usage:
        prompt = sum(s.admission.prompt_tokens for s in self.streams[:: self.n])
        completion = sum(e.completion_tokens for e in self.finals if e is not None)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)

    def finish_reason(self, i: int) -> str:
        event = self.finals[i]
        reason = event.finish_reason if event is not None else None
        if reason == "cancelled":
            raise GenerationCancelledError("the request was cancelled before it finished")
        if reason not in _FINISH_REASONS:
            raise GenerationFailedError("generation failed; see the server log")
        return _FINISH_REASONS[reason]

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()  # a no-op for streams that already finished

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(stream index, event) as they arrive across all streams; errors raise at the end."""
        queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

        async def pump(i: int, stream: GenerationStream) -> None:
            async for event in stream:
                queue.put_nowait((i, event))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            left = len(self.streams)
            while left:
                i, event = await queue.get()
                if event.finish_reason is not None:
                    left -= 1
                    self.finals[i] = event
                    self.finish_reason(i)  # raises for "error" / "cancelled"
                yield i, event
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self, request: Request) -> list[str]:
        """Every stream's whole text. If the client hangs up first, cancel and stop."""

        async def read(i: int, stream: GenerationStream) -> str:
            parts = []
            async for event in stream:
                parts.append(event.text)
                self.finals[i] = event if event.finish_reason is not None else None
            return "".join(parts)

        reading = asyncio.gather(*(read(i, s) for i, s in enumerate(self.streams)))
        watching = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({reading, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                raise ClientDisconnect()
            texts = reading.result()
        finally:
            watching.cancel()
            reading.cancel()
            self.cancel()
        for i in range(len(self.streams)):
            self.finish_reason(i)
        return texts


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def start_run(
    request: Request, engine: Engine, body: SamplingFields, model: str,
    prompts: list[tuple[str, str]], rid: str, n: int = 1,
) -> Run:
    """Validate everything, then admit `n` sequences per (prompt, route text) pair.

    All checks happen here, before any byte of a response, so that streaming requests still
    fail with a proper status.
    """
    settings = get_settings(request)
    note_model(request, engine, model)
    check_model(engine, model)
    if not 1 <= n <= settings.max_n:
        raise InvalidParameterError(f"n must be in [1, {settings.max_n}], got {n}", param="n")
    method = merge_method(body.merge)
    routing = routing_options(engine, model, body.routing)
    sampling = sampling_params(settings, body)
    requests = [
        GenerationRequest(
            prompt=prompt, route_text=route_text, model=model, routing=routing,
            sampling=_seeded(sampling, k),
            request_id=f"{rid}-{j * n + k}",
        )
        for j, (prompt, route_text) in enumerate(prompts)
        for k in range(n)
    ]
    return await Run.start(engine, requests, method, n)


def _seeded(params: SamplingParams, k: int) -> SamplingParams:
    """Choice k of n uses seed + k, so each choice is reproducible on its own."""
    return params if params.seed is None else replace(params, seed=params.seed + k)
