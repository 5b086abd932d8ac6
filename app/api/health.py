"""Liveness, readiness and Prometheus metrics. Public: no API key, so probes need no secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import get_engine, ready_engine
from app.api.errors import LoadFailedError
from app.api.openapi import responses
from app.engine.types import EngineDeadError
from app.protocol import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


def _check_loaded(request: Request) -> None:
    error = request.app.state.load_error
    if error is not None:
        raise LoadFailedError(f"loading the model failed: {error}")


@router.get("/health", responses=responses(500, 503))
async def health(request: Request) -> HealthResponse:
    """Alive: answers while loading and draining too; 500 if loading failed, 503 once the
    engine's worker is dead (an orchestrator should restart the process)."""
    _check_loaded(request)
    engine = get_engine(request)
    state = engine.health()
    if state == "dead":
        raise EngineDeadError(f"the engine is dead: {engine.stats().dead_reason}")
    return HealthResponse(status="ok" if state == "ready" else state)


@router.get("/ready", responses=responses(500, 503))
async def ready(request: Request) -> ReadyResponse:
    """200 once base, adapters and index are loaded and warmed up; 503 before and while
    draining, so a load balancer stops sending traffic the moment SIGTERM arrives."""
    _check_loaded(request)
    stats = ready_engine(request).stats()
    return ReadyResponse(status="ready", adapters=stats.adapters, device=stats.device,
                         dtype=stats.dtype, queued=stats.queued, running=stats.running)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
