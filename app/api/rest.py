"""REST routes: the routing decision alone, plain text generation, and embeddings.

`/v1/embeddings` is OpenAI-shaped (the official client's `embeddings.create` works, including
its default base64 encoding) and comes from the router's own embedder.
"""

from __future__ import annotations

import base64
import uuid

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    chat_texts,
    get_settings,
    note_model,
    ready_engine,
    require_api_key,
    routing_options,
)
from app.api.errors import InvalidParameterError
from app.api.openapi import GENERATION_ERRORS, generation_200, responses
from app.api.runs import start_run
from app.protocol import (
    AdapterWeight,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    GenerateRequest,
    GenerateResponse,
    MergePreviewRequest,
    MergePreviewResponse,
    NearestExemplar,
    RouteRequest,
    RouteResponse,
)

router = APIRouter(prefix="/v1", tags=["rest"], dependencies=[Depends(require_api_key)])


@router.post("/route", responses=responses(400, 401, 404, 409, 413, 503))
async def route(body: RouteRequest, request: Request) -> RouteResponse:
    engine = ready_engine(request)
    note_model(request, engine, "auto")
    if (body.text is None) == (body.messages is None):
        raise InvalidParameterError("give exactly one of `text` and `messages`", param="text")
    text = body.text if body.text is not None else chat_texts(body.messages or [])[1]
    options = routing_options(get_settings(request), engine, "auto", body.routing)
    decision = await run_in_threadpool(engine.route, text, options)
    return RouteResponse(
        adapters=[AdapterWeight(id=h.adapter_id, score=h.score, weight=h.weight)
                  for h in decision.hits],
        scores=decision.scores,
        fallback=decision.fallback,
        nearest=[NearestExemplar(adapter=e.adapter_id, text=e.text, score=e.score)
                 for e in decision.nearest],
        latency_ms=decision.latency_s * 1000,
    )


@router.post("/generate", response_model=None,
             responses={200: generation_200(GenerateResponse), **responses(*GENERATION_ERRORS)})
async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
    engine = ready_engine(request)
    prompt = body.prompt
    if body.chat:
        prompt = await run_in_threadpool(engine.render_chat,
                                         [{"role": "user", "content": body.prompt}])
    rid = f"gen-{uuid.uuid4().hex}"
    run = await start_run(request, engine, body, body.model, [(prompt, body.prompt)], rid)
    (text,) = await run.collect(request)
    response = GenerateResponse(
        id=rid, model=body.model, text=text, finish_reason=run.finish_reason(0),
        usage=run.usage(), routing=run.routing(),
    )
    return JSONResponse(response.model_dump(), headers=run.headers())


@router.post("/merge/preview", responses=responses(400, 401, 404, 413, 503))
async def merge_preview(body: MergePreviewRequest, request: Request) -> MergePreviewResponse:
    """Interference statistics of merging some adapters, before anything is served."""
    engine = ready_engine(request)
    if (body.adapters is None) == (body.prompt is None):
        raise InvalidParameterError("give exactly one of `adapters` and `prompt`",
                                    param="adapters")
    ids = body.adapters
    if ids is None:
        options = routing_options(get_settings(request), engine, "auto", body.routing)
        decision = await run_in_threadpool(engine.route, body.prompt, options)
        ids = [hit.adapter_id for hit in decision.hits]
        if not ids:  # the prompt falls back to the base model: nothing is merged
            return MergePreviewResponse(
                adapters=[], modules=0, cosine=[], sign_conflict_total=0.0, sign_conflict={},
                removed_mass={}, parallel_fraction=None, fallback=True)
    stats = await run_in_threadpool(engine.preview_merge, list(ids), body.max_modules)
    return MergePreviewResponse(
        adapters=list(ids),
        modules=len(stats.sign_conflict),
        cosine=stats.cosine,
        sign_conflict_total=stats.sign_conflict_total,
        sign_conflict=stats.sign_conflict,
        removed_mass={m: dict(zip(ids, f, strict=True)) for m, f in stats.removed_mass.items()},
        parallel_fraction=None if stats.parallel_fraction is None
        else dict(zip(ids, stats.parallel_fraction, strict=True)),
    )


@router.post("/embeddings", responses=responses(400, 401, 413, 503))
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    engine = ready_engine(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None and body.dimensions != engine.embedding_dim:
        raise InvalidParameterError(
            f"{engine.embedder_name} has {engine.embedding_dim} dimensions; it cannot return "
            f"{body.dimensions}", param="dimensions",
        )
    vectors, tokens = await run_in_threadpool(engine.embed, texts)
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=_encoded(v, body.encoding_format))
              for i, v in enumerate(vectors)],
        model=engine.embedder_name,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
