"""Start-up, overload, client disconnects and the SIGTERM drain, on a server that owns its engine.

The engine is loaded by the app's lifespan (not the shared fixture), with a queue of one so
that a single long request fills it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from server import LiveServer

from app.engine.stream import GenerationStream
from app.main import create_app
from app.settings import Settings

# Long enough to still be generating when the test acts (micro model: ~250-token context).
LONG = {"model": "base", "prompt": "Hello", "max_tokens": 240, "temperature": 0}


@pytest.fixture(scope="module")
def server(micro_settings: Settings) -> Iterator[LiveServer]:
    settings = micro_settings.model_copy(update={"max_queue": 1, "drain_timeout_s": 20.0})
    live = LiveServer(create_app(settings))
    with live:
        yield live


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0,
              poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def _cancelled() -> float:
    sample = REGISTRY.get_sample_value("dynamerge_finished_requests_total", {"reason": "cancelled"})
    return sample or 0.0


def _idle(server: LiveServer) -> bool:
    stats = server.app.state.engine.stats()
    return stats.queued == 0 and stats.running == 0


class _Stream:
    """A streaming completion read in a background thread; `first` is set at the first token,
    `close()` hangs up (the reader leaves the response unread, which drops the connection)."""

    def __init__(self, server: LiveServer, max_tokens: int = LONG["max_tokens"]) -> None:
        self.client = server.client()
        self.body = {**LONG, "max_tokens": max_tokens, "stream": True}
        self.first = threading.Event()
        self.hang_up = threading.Event()
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self.client.stream("POST", "/v1/completions", json=self.body) as r:
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                    if len(self.lines) >= 2:  # the routing chunk, then a token
                        self.first.set()
                    if self.hang_up.is_set():
                        return
        finally:
            self.first.set()

    def close(self) -> None:
        self.hang_up.set()
        self.thread.join(10)
        self.client.close()


def test_health_answers_while_loading_and_ready_only_after(server: LiveServer) -> None:
    with server.client() as http:
        # uvicorn serves as soon as the lifespan has started the load (which takes seconds).
        first_ready = http.get("/ready")
        assert first_ready.status_code == 503
        assert first_ready.json()["error"]["code"] == "not_ready"
        assert http.get("/health").status_code == 200
        _wait_for(lambda: http.get("/ready").status_code == 200, timeout_s=120)
        assert http.get("/health").json() == {"status": "ok"}


def test_overload_is_429(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Paced steps keep the long stream running (>= 240 x 20 ms) while the test acts, however
    # fast the decode path is.
    _StepLedger(server.app.state.engine, monkeypatch, pause_s=0.02)
    stream = _Stream(server)
    try:
        assert stream.first.wait(30)
        with server.client() as http:
            response = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
            assert response.status_code == 429
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
    finally:
        stream.close()
    _wait_for(lambda: _idle(server))


def test_client_disconnect_stops_generation(server: LiveServer) -> None:
    before = _cancelled()
    stream = _Stream(server)
    assert stream.first.wait(30)
    stream.close()  # hang up mid-stream
    _wait_for(lambda: _cancelled() == before + 1, timeout_s=10)
    _wait_for(lambda: _idle(server), timeout_s=10)

    # Same for a non-streaming request whose client hangs up while it runs.
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        _wait_for(lambda: not _idle(server), timeout_s=10, poll_s=0.001)
    _wait_for(lambda: _cancelled() == before + 2, timeout_s=10)
    _wait_for(lambda: _idle(server), timeout_s=10)
    with server.client() as http:
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


class _StepLedger:
    """Counts the engine's scheduler steps and notes the step at which a request's stream
    was cancelled, so a test can tell how many decode steps a hung-up row still took."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch, pause_s: float = 0.01) -> None:
        self.scheduler = engine.scheduler
        self.steps = 0
        self.active_after: list[int] = []  # scheduler.active after each step
        self.cancelled_at: dict[str, int] = {}  # request id -> steps begun when cancelled
        step, cancel = self.scheduler.step, GenerationStream.cancel

        def counted_step() -> None:
            self.steps += 1
            step()
            time.sleep(pause_s)  # the micro model is fast: keep answers long enough to leave
            self.active_after.append(self.scheduler.active)

        def noted_cancel(stream: GenerationStream) -> None:
            if stream.final is None:  # the request was still running
                self.cancelled_at.setdefault(stream.request_id, self.steps)
            cancel(stream)

        monkeypatch.setattr(self.scheduler, "step", counted_step)
        monkeypatch.setattr(GenerationStream, "cancel", noted_cancel)

    def released_within_one_step(self, prefix: str) -> None:
        (request_id, at), = [(r, s) for r, s in self.cancelled_at.items()
                             if r.startswith(prefix)]
        _wait_for(lambda: len(self.active_after) > at)
        # The step begun after the cancel drops the row before it decodes again.
        assert self.active_after[at] == 0, (request_id, at, self.active_after[at - 2:at + 2])
        assert REGISTRY.get_sample_value("dynamerge_running_requests") == 0


def test_a_gone_client_frees_its_row_within_one_decode_step(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wait_for(lambda: _idle(server))
    ledger = _StepLedger(server.app.state.engine, monkeypatch)
    stream = _Stream(server)
    assert stream.first.wait(30)
    _wait_for(lambda: ledger.steps >= 3)  # decoding
    stream.close()  # the streaming client goes away mid-answer
    _wait_for(lambda: any(r.startswith("cmpl-") for r in ledger.cancelled_at), timeout_s=10)
    ledger.released_within_one_step("cmpl-")
    assert server.app.state.engine.stats().running == 0

    ledger.cancelled_at.clear()
    # A non-streaming client that times out.
    with server.client(timeout=httpx.Timeout(30.0, read=0.5)) as http, pytest.raises(
            httpx.ReadTimeout):
        http.post("/v1/completions", json=LONG)
    _wait_for(lambda: any(r.startswith("cmpl-") for r in ledger.cancelled_at), timeout_s=10)
    ledger.released_within_one_step("cmpl-")
    assert server.app.state.engine.stats().running == 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(server: LiveServer) -> None:
    engine = server.app.state.engine
    stream = _Stream(server, max_tokens=60)
    assert stream.first.wait(30)
    server.sigterm()
    assert engine.draining  # at once, not after uvicorn's next tick
    probe = TestClient(server.app)  # the listener closes, so ask the app itself
    assert probe.get("/ready").status_code == 503
    refused = probe.post("/v1/completions", json={**LONG, "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    stream.thread.join(30)
    assert stream.lines[-1] == "data: [DONE]"
    last = json.loads(stream.lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cut
    server.join(30)
    assert not server.running
    stream.close()
