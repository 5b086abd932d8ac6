"""The handle a caller holds on a submitted request: events out, cancellation in."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from app.engine.types import Admission, TokenEvent


class GenerationStream:
    """Receives a request's `TokenEvent`s from the engine's threads.

    Iterate it synchronously, or asynchronously when it was created with the caller's event
    loop (events then cross threads through `call_soon_threadsafe`, never blocking the loop).
    The last event has `finish_reason` set; it is also kept in `final`.

    A request is *settled* once its adapters are placed on the device (it will start) or it
    has finished without starting (an error): `settled()` lets an HTTP route wait for that
    before it commits to a status code.
    """

    def __init__(self, admission: Admission, loop: asyncio.AbstractEventLoop | None) -> None:
        self.admission = admission
        self._loop = loop
        self._sync: queue.Queue[TokenEvent] = queue.Queue()
        self._async: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._settled = threading.Event()
        self._settled_async = asyncio.Event()
        self.final: TokenEvent | None = None

    @property
    def request_id(self) -> str:
        return self.admission.request_id

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (the client went away)."""
        self._cancelled.set()

    def mark_placed(self) -> None:
        """Called by the engine once the request's adapters are resident."""
        self._settle()

    def put(self, event: TokenEvent) -> None:
        """Called by the engine's threads."""
        if event.finish_reason is not None:
            self.final = event
        if self._loop is None:
            self._sync.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the caller's loop is closed: nobody will read this
                self._cancelled.set()
        if event.finish_reason is not None:
            self._settle()

    def _settle(self) -> None:
        self._settled.set()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                self._loop.call_soon_threadsafe(self._settled_async.set)

    async def settled(self) -> TokenEvent | None:
        """Wait until the request is placed or finished; the final event if it finished."""
        await self._settled_async.wait()
        return self.final

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._sync.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._async.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> tuple[str, TokenEvent]:
        """Block until done (sync streams only). Returns the whole text and the final event."""
        parts = []
        for event in self:
            parts.append(event.text)
        return "".join(parts), event
