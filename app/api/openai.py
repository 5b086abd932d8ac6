"""OpenAI-compatible routes: chat completions, completions and the model list.

Each route parses, hands the engine its requests through `start_run`, and turns the engine's
events into OpenAI responses or SSE chunks. Routing and blending happen in the engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.deps import (
    chat_texts,
    check_logprobs,
    check_model,
    ready_engine,
    refuse_unsupported,
    require_api_key,
)
from app.api.errors import error_body
from app.api.logprobs import chat_logprobs, completion_logprobs, joined, prompt_logprobs
from app.api.openapi import GENERATION_ERRORS, generation_200, responses
from app.api.runs import Run, start_run
from app.engine.types import TokenEvent
from app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    StreamOptions,
)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

ChunkOf = Callable[[int, TokenEvent, str | None], str]  # (choice, event, finish) -> chunk JSON


@router.get("/models", responses=responses(401, 503))
async def list_models(request: Request) -> ModelList:
    engine = ready_engine(request)
    return ModelList(data=[ModelCard(id=model) for model in engine.models()])


@router.get("/models/{model}", responses=responses(401, 404, 503))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    engine = ready_engine(request)
    check_model(engine, model)  # 404 model_not_found, as OpenAI answers
    return ModelCard(id=model)


@router.post("/chat/completions", response_model=None,
             responses={200: generation_200(ChatCompletion), **responses(*GENERATION_ERRORS)})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    engine = ready_engine(request)
    refuse_unsupported(body, body.n)
    check_logprobs(body)
    messages, route_text = chat_texts(body.messages)
    engine.check_capacity(body.n)  # a full server answers 429 before any work
    prompt = await run_in_threadpool(engine.render_chat, messages)  # templating is CPU work
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    run = await start_run(request, engine, body, body.model, [(prompt, route_text)], rid, body.n)
    with_logprobs = body.logprob_count() is not None
    if body.stream:
        def chunk(i: int, event: TokenEvent, finish: str | None) -> str:
            logprobs = chat_logprobs(engine, event.logprobs) if with_logprobs else None
            choice = ChatChunkChoice(index=i, delta=Delta(content=event.text),
                                     finish_reason=finish, logprobs=logprobs)
            return ChatCompletionChunk(id=rid, model=body.model, choices=[choice]).model_dump_json(
                exclude={"routing"})

        first = ChatCompletionChunk(
            id=rid, model=body.model, routing=run.routing(),
            choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                     for i in range(len(run.streams))],
        )
        usage = ChatCompletionChunk(id=rid, model=body.model, choices=[])
        return EventStream(
            _sse(run, first.model_dump_json(), chunk, usage, body.stream_options), run
        )
    texts = await run.collect(request)
    response = ChatCompletion(
        id=rid, model=body.model, usage=run.usage(), routing=run.routing(),
        choices=[ChatChoice(index=i, message=AssistantMessage(content=text),
                            finish_reason=run.finish_reason(i),
                            logprobs=chat_logprobs(engine, run.logprobs[i]) if with_logprobs
                            else None)
                 for i, text in enumerate(texts)],
    )
    return JSONResponse(response.model_dump(), headers=run.headers())


@router.post("/completions", response_model=None,
             responses={200: generation_200(Completion), **responses(*GENERATION_ERRORS)})
async def completions(body: CompletionRequest, request: Request) -> Response:
    engine = ready_engine(request)
    refuse_unsupported(body, body.n)
    prompts = body.prompts()
    rid = f"cmpl-{uuid.uuid4().hex}"
    run = await start_run(request, engine, body, body.model,
                          [(p, p if isinstance(p, str) else "") for p in prompts], rid, body.n)
    with_logprobs = body.logprobs is not None
    echo = bool(body.echo)  # the engine then sends each choice's prompt event first

    def prompt_text(i: int, event: TokenEvent) -> str:
        prompt = prompts[i // run.n]  # the client's own text; token ids: their decoded text
        return prompt if isinstance(prompt, str) else event.prompt_text

    # One routing per prompt: with several prompts each choice says how it was blended.
    per_choice = len(prompts) > 1
    if body.stream:
        offsets = [0] * len(run.streams)  # characters each choice has streamed so far

        def chunk(i: int, event: TokenEvent, finish: str | None) -> str:
            logprobs = None
            text = event.text
            if event.prompt_ids:
                text = prompt_text(i, event)
                if with_logprobs:
                    logprobs = prompt_logprobs(engine, event)
            elif with_logprobs:
                logprobs = completion_logprobs(engine, event.logprobs, offsets[i])
            if logprobs is not None:
                offsets[i] = sum(len(t) for t in logprobs.tokens) + offsets[i]
            choice = CompletionChoice(index=i, text=text, finish_reason=finish,
                                      logprobs=logprobs)
            return Completion(id=rid, model=body.model, choices=[choice]).model_dump_json(
                exclude={"usage": True, "routing": True, "choices": {"__all__": {"routing"}}})

        first = Completion(id=rid, model=body.model, choices=[], routing=run.routing())
        usage = Completion(id=rid, model=body.model, choices=[])
        return EventStream(_sse(run, first.model_dump_json(exclude={"usage"}), chunk, usage,
                                body.stream_options), run)
    texts = await run.collect(request)

    def choice_logprobs(i: int) -> CompletionLogprobs | None:
        if not with_logprobs:
            return None
        generated = completion_logprobs(engine, run.logprobs[i])
        prompt = run.prompts[i]
        return joined([prompt_logprobs(engine, prompt), generated]) if prompt else generated

    if echo:
        texts = [prompt_text(i, run.prompts[i]) + text  # type: ignore[arg-type]
                 for i, text in enumerate(texts)]
    response = Completion(
        id=rid, model=body.model, usage=run.usage(), routing=run.routing(),
        choices=[CompletionChoice(
            index=i, text=text, finish_reason=run.finish_reason(i),
            logprobs=choice_logprobs(i), routing=run.routing(i) if per_choice else None,
        ) for i, text in enumerate(texts)],
    )
    exclude = None if per_choice else {"choices": {"__all__": {"routing"}}}
    return JSONResponse(response.model_dump(exclude=exclude), headers=run.headers())


async def _sse(
    run: Run, first: str, chunk: ChunkOf, usage: ChatCompletionChunk | Completion,
    options: StreamOptions | None,
) -> AsyncIterator[str]:
    """The SSE body: a first chunk with the routing, the tokens, usage if asked, [DONE].

    Errors after the first byte can no longer change the status, so they travel as an
    OpenAI error event (the official client raises it as an APIError).
    """
    yield _data(first)
    try:
        async for i, event in run.events():
            finish = run.finish_reason(i) if event.finish_reason is not None else None
            if event.token_ids or event.prompt_ids or finish is not None:  # a chunk per token
                yield _data(chunk(i, event, finish))
        if options is not None and options.include_usage:
            usage.usage = run.usage()
            yield _data(usage.model_dump_json(exclude={"routing"}))
    except Exception as exc:
        yield _data(json.dumps(error_body(exc)[1]))
    yield _data("[DONE]")


def _data(payload: str) -> str:
    return f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """SSE whose engine streams are cancelled whenever the response ends, however it ends:
    finished, client gone (Starlette cancels the body iterator), or server shutdown."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], run: Run) -> None:
        headers = {**run.headers(), "cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(content, headers=headers)
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()
