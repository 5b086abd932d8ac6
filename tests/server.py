"""A real uvicorn server on a free loopback port, in a background thread, for API tests.

It runs the production `DrainingServer` (so `sigterm()` exercises the real drain hook: uvicorn
installs no signal handlers outside the main thread, so the test calls the handler itself).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from types import TracebackType

import httpx
from fastapi import FastAPI

from app.main import server_for


class LiveServer:
    def __init__(self, app: FastAPI, start_timeout_s: float = 60.0) -> None:
        self.app = app
        self.start_timeout_s = start_timeout_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # uvicorn's own sockets get TCP_NODELAY from asyncio; a socket handed to it does not,
        # and Nagle with delayed ACKs then adds 40 ms to every request on loopback.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server_for(app, host="127.0.0.1", port=self.port, log_level="warning",
                                 log_config=None)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="test-uvicorn",
            daemon=True,
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30.0, **kwargs})

    def sigterm(self) -> None:
        """What uvicorn does on SIGTERM in the main thread."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.join(timeout_s)

    def join(self, timeout_s: float = 30.0) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
