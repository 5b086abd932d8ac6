"""The HTTP service: `create_app(settings)` and `serve(settings)` (what `dynamerge serve` runs).

Start-up: uvicorn binds at once and the lifespan loads base, adapters and index (with warm-up)
in a thread, so `/health` answers during a long load while `/ready` stays 503 until the engine
is ready. Shutdown: SIGTERM marks the engine draining at once (`/ready` and new requests 503),
uvicorn lets requests in flight finish within `drain_timeout_s`, then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api import ROUTERS
from app.api.errors import (
    RequestTooLargeError,
    error_response,
    hide_paths,
    install_error_handlers,
)
from app.api.openapi import install_openapi
from app.engine.engine import Engine
from app.settings import Settings

log = logging.getLogger(__name__)
_DESCRIPTION = (
    "OpenAI-compatible inference with per-request dynamic LoRA merging. Errors are "
    '`{"error": {"message", "type", "param", "code"}}`; 429 and 503 carry `Retry-After`.'
)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: server settings (keys, body limit, ...); read from the environment if None.
        engine: an engine to serve. If it is already loaded the lifespan uses it as is and
            leaves its lifecycle to the caller (tests share one); otherwise the lifespan loads
            it, and drains and shuts it down at the end.
    """
    settings = settings or Settings()
    owned = engine is None
    engine = engine or Engine(settings)
    # The document and its viewer need the API key like every /v1 route (see api/docs.py).
    app = FastAPI(title="dynamerge", version="0.1.0", lifespan=_lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None, description=_DESCRIPTION)
    app.state.settings = settings
    app.state.engine = engine
    app.state.owns_engine = owned
    app.state.load_error = None
    app.state.on_fatal = None  # set by serve(): stop the server if loading fails
    install_error_handlers(app)
    hide_paths(settings.adapter_store, settings.base_model, settings.cache_dir,
               settings.embedder_path, settings.calibration_file)
    for router in ROUTERS:
        app.include_router(router)
    install_openapi(app, settings, lambda: engine.embedding_dim if engine.ready else None)
    # Added last = outermost: the metric sees every response, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    # Load only an engine that never loaded: a dead one stays dead (and says so).
    loading = asyncio.create_task(_load(app, engine)) if engine.health() == "loading" else None
    yield
    if loading is not None and not loading.done():
        log.warning("shutting down before the engine finished loading")
    if app.state.owns_engine:
        engine.draining = True
        # uvicorn has already spent the drain budget waiting for open requests (and cancelled
        # those past it): what remains are sequences stopping at their next step.
        if not await asyncio.to_thread(engine.drain, min(app.state.settings.drain_timeout_s, 5)):
            log.warning("requests still running after the drain timeout")
        await asyncio.to_thread(engine.shutdown)


async def _load(app: FastAPI, engine: Engine) -> None:
    """Engine.load in a daemon thread: a hung load never blocks interpreter exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: Exception | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def work() -> None:
        error = None
        try:
            engine.load(show_progress=sys.stderr.isatty())
        except Exception as exc:  # reported to the loop, which decides what to do
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we loaded
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=work, name="dynamerge-load", daemon=True).start()
    try:
        await done
    except Exception as exc:
        log.exception("loading the engine failed")
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        if app.state.on_fatal is not None:
            app.state.on_fatal()


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting the bytes
    of bodies sent without one (chunked), before the app sees any of it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLargeError(f"the request body exceeds {self.max_bytes} bytes")
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        # Buffer the body (it is bounded by the limit) and replay it to the app.
        messages: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
            more = message.get("more_body", False)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint (the route template), model and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = scope.get("state", {}).get("model", "")
            metrics.REQUESTS.labels(endpoint=endpoint, model=model, status=str(status)).inc()


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT mark the engine draining before anything else, so
    `/ready` turns 503 and new requests are refused while open ones finish."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process dies by
        the signal (exit 143). A drained server has done what the signal asked: exit 0, as
        orchestrators expect from a clean stop."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def server_for(app: FastAPI, **config: object) -> DrainingServer:
    """A DrainingServer for `app` whose graceful-shutdown timeout is the drain timeout."""
    settings: Settings = app.state.settings
    engine: Engine = app.state.engine

    def start_draining() -> None:
        if not engine.draining:
            log.info("draining: finishing requests in flight, refusing new ones")
        engine.draining = True

    options = {
        "host": settings.host, "port": settings.port, "lifespan": "on",
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.drain_timeout_s, **config,
    }
    server = DrainingServer(uvicorn.Config(app, **options), start_draining)
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)
    return server


def serve(settings: Settings | None = None) -> int:
    """Serve until SIGTERM / SIGINT. Returns the process exit status."""
    settings = settings or Settings()
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    log.info("dynamerge on http://%s:%d (adapter store %s)", settings.host, settings.port,
             settings.adapter_store)
    server_for(app).run()
    return 1 if app.state.load_error is not None else 0


__all__ = ["DrainingServer", "create_app", "serve", "server_for"]
