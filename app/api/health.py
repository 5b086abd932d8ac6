"""Liveness, readiness and Prometheus metrics. Public: no API key, so probes need no secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import get_engine, ready_engine
from app.api.errors import LoadFailedError
from app.engine.types import EngineDeadError

router = APIRouter(tags=["health"])


def _check_loaded(request: Request) -> None:
    error = request.app.state.load_error
    if error is not None:
        raise LoadFailedError(f"loading the model failed: {error}")


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """Alive: answers while loading and draining too; 500 if loading failed, 503 once the
    engine's worker is dead (an orchestrator should restart the process)."""
    _check_loaded(request)
    engine = get_engine(request)
    state = engine.health()
    if state == "dead":
        raise EngineDeadError(f"the engine is dead: {engine.stats().dead_reason}")
    return {"status": "ok" if state == "ready" else state}


@router.get("/ready")
async def ready(request: Request) -> dict[str, object]:
    """200 once base, adapters and index are loaded and warmed up; 503 before and while
    draining, so a load balancer stops sending traffic the moment SIGTERM arrives."""
    _check_loaded(request)
    stats = ready_engine(request).stats()
    return {"status": "ready", "adapters": stats.adapters, "device": stats.device,
            "dtype": stats.dtype, "queued": stats.queued, "running": stats.running}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
