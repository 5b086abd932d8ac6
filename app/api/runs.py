"""From a parsed request to engine streams and back: admission off the event loop, n streams
merged, cancellation when the client goes away.

A run is returned only once every stream is settled (its adapters are on the device, or it
failed before starting), so that a request that cannot be placed still gets its real status
(503) rather than a stream that breaks after `200 OK`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from app.api.deps import (
    check_model,
    check_n,
    get_settings,
    merge_spec,
    note_model,
    routing_options,
    sampling_params,
)
from app.engine.protocol import EngineClient
from app.engine.stream import GenerationStream
from app.engine.types import (
    GenerationError,
    GenerationRequest,
    RequestCancelledError,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from app.protocol import AdapterWeight, PromptTokensDetails, RoutingInfo, SamplingFields, Usage

# The engine's finish reasons that complete a request; the others become table errors.
log = logging.getLogger(__name__)
_FINISH_REASONS = {"stop": "stop", "length": "length"}
ADAPTERS_HEADER = "x-dynamerge-adapters"


def _submit_all(
    engine: EngineClient, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop
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

    def __init__(self, streams: list[GenerationStream], n: int) -> None:
        self.streams = streams
        self.n = n
        self.finals: list[TokenEvent | None] = [None] * len(streams)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in streams]  # filled by collect()
        self.prompts: list[TokenEvent | None] = [None] * len(streams)  # echo: by collect()

    @classmethod
    async def start(
        cls, engine: EngineClient, requests: list[GenerationRequest], n: int
    ) -> Run:
        """Admit every request (routing and admission run in a worker thread, off the loop),
        then wait until all are settled; a request that failed first raises its error."""
        loop = asyncio.get_running_loop()
        run = cls(await run_in_threadpool(_submit_all, engine, requests, loop), n)
        try:
            finals = [await stream.settled() for stream in run.streams]
        except BaseException:
            run.cancel()  # the client went away while the adapters were being placed
            raise
        for final in finals:
            if final is not None and final.error is not None:
                run.cancel()
                raise final.error
        return run

    def routing(self, i: int = 0) -> RoutingInfo:
        admission = self.streams[i].admission
        scores = admission.decision.scores if admission.decision is not None else {}
        return RoutingInfo(
            adapters=[AdapterWeight(id=a, score=scores.get(a), weight=w)
                      for a, w in admission.blend],
            method=admission.method,
            fallback=admission.decision is not None and admission.decision.fallback,
            cache_hit=bool(admission.cache_hit),
        )

    def headers(self) -> dict[str, str]:
        blend = self.streams[0].admission.blend
        return {ADAPTERS_HEADER: ",".join(f"{a}={w:.3f}" for a, w in blend) or "base"}

    def usage(self) -> Usage:
        prompt = sum(s.admission.prompt_tokens for s in self.streams[:: self.n])
        completion = sum(e.completion_tokens for e in self.finals if e is not None)
        cached = sum(e.cached_tokens for e in self.finals[:: self.n] if e is not None)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def finish_reason(self, i: int) -> str:
        """The OpenAI finish reason of choice i; raises the engine's error if it failed."""
        event = self.finals[i]
        reason = event.finish_reason if event is not None else None
        if reason in _FINISH_REASONS:
            return _FINISH_REASONS[reason]
        if event is not None and event.error is not None:
            raise event.error
        if reason == "cancelled":
            raise RequestCancelledError("the request was cancelled before it finished")
        raise GenerationError("generation failed; see the server log")

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
                if event.prompt_ids:  # the echoed prompt (it has no text of the completion)
                    self.prompts[i] = event
                    continue
                parts.append(event.text)
                self.logprobs[i].extend(event.logprobs)
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
    request: Request, engine: EngineClient, body: SamplingFields, model: str,
    prompts: list[tuple[str | list[int], str]], rid: str, n: int = 1,
) -> Run:
    """Validate everything, then admit `n` sequences per (prompt, route text) pair.

    A prompt is text or the base model's token ids (then the engine routes on their text).

    All checks happen here, before any byte of a response, so that streaming requests still
    fail with a proper status.
    """
    settings = get_settings(request)
    note_model(request, engine, model)
    check_model(engine, model)
    check_n(settings, n)
    engine.check_capacity(len(prompts) * n)
    merge = merge_spec(engine, body.merge)
    routing = routing_options(settings, engine, model, body.routing)
    sampling = sampling_params(settings, body)
    extra = body.model_extra or {}
    user = getattr(body, "user", None) or extra.get("safety_identifier")
    if user is not None:  # an opaque end-user id: kept with the request id for abuse tracing
        log.debug("request %s from end user %r", rid, user)
    requests = [
        GenerationRequest(
            prompt=prompt if isinstance(prompt, str) else "",
            prompt_ids=None if isinstance(prompt, str) else tuple(prompt),
            route_text=route_text, model=model, routing=routing, merge=merge,
            sampling=_seeded(sampling, k),
            request_id=f"{rid}-{j * n + k}",
        )
        for j, (prompt, route_text) in enumerate(prompts)
        for k in range(n)
    ]
    return await Run.start(engine, requests, n)


def _seeded(params: SamplingParams, k: int) -> SamplingParams:
    """Choice k of n uses seed + k, so each choice is reproducible on its own."""
    return params if params.seed is None else replace(params, seed=params.seed + k)
