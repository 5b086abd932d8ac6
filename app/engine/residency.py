"""Adapter residency at admission: disk -> host -> device, beside the decode loop.

A request is routed over every adapter of the store; it may start only once the adapters of
its blend sit in device slots, pinned for it. When they already do, `admit` pins them at once.
Otherwise the job waits (the scheduler holds it, unstarted) while the loader thread reads what
is missing from disk into the host tier, then writes it into slots it frees by evicting the
least recently used idle adapters. The decode loop only pauses for the slot writes (a few
milliseconds under the model lock), never for a disk read.

Placement is all or nothing: a job pins its adapters only when every one of them can be made
resident at once, so waiting jobs never hold slots that others need (no deadlock). A job that
cannot be placed within `timeout_s` fails with `AdapterPlacementError` (a 503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters.errors import AdapterError
from adapters.host_cache import HostCache
from adapters.store import AdapterStore
from adapters.virtual import VirtualAdapter
from app import metrics
from app.engine.device_slots import DeviceSlots, Pool
from app.engine.scheduler import Job
from app.engine.types import AdapterPlacementError, GenerationError, InvalidRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One adapter a request blends: a store adapter, or a merged (virtual) one."""

    adapter_id: str
    weight: float
    virtual: VirtualAdapter | None = None

    @property
    def pool(self) -> Pool:
        return "virtual" if self.virtual is not None else "adapter"


@dataclass(eq=False)
class _Pending:
    job: Job
    targets: tuple[Target, ...]
    deadline: float
    since: float


class Residency:
    """Places jobs' adapters on the device; one loader thread does the slow part.

    Args:
        slots: the device tier.
        store: the disk tier.
        host: the host tier.
        model_lock: held by every forward pass; slot writes take it too.
        wake: tells the scheduler that a waiting job was placed or failed.
        timeout_s: how long a job may wait for its adapters.
    """

    def __init__(
        self,
        slots: DeviceSlots,
        store: AdapterStore,
        host: HostCache,
        model_lock: threading.RLock,
        wake: Callable[[], None],
        timeout_s: float,
    ) -> None:
        self.slots = slots
        self.store = store
        self.host = host
        self.model_lock = model_lock
        self.wake = wake
        self.timeout_s = timeout_s
        self._lock = threading.Condition()
        self._pending: list[_Pending] = []
        self._pinned_forever: set[str] = set()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dynamerge-loader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Jobs waiting for their adapters."""
        return len(self._pending)

    # --- admission ------------------------------------------------------------------------
    def admit(self, job: Job, targets: tuple[Target, ...]) -> bool:
        """Pin the job's adapters if they are all resident (True); else queue it for the
        loader (False). Either way the job reaches the scheduler, which starts it once placed.

        Raises:
            InvalidRequestError: the blend needs more slots than the device has.
        """
        for pool in ("adapter", "virtual"):
            need = sum(1 for t in targets if t.pool == pool)
            size = self.slots.num_adapters if pool == "adapter" else self.slots.num_virtual
            if need > size:
                raise InvalidRequestError(
                    f"the request blends {need} adapters but the device has {size} {pool} "
                    "slots; lower routing.top_k", param="routing.top_k",
                )
        with self._lock:
            hits = sum(1 for t in targets if t.adapter_id in self.slots)
            metrics.DEVICE_SLOT_LOOKUPS.labels(result="hit").inc(hits)
            metrics.DEVICE_SLOT_LOOKUPS.labels(result="miss").inc(len(targets) - hits)
            if hits == len(targets):
                self._pin_all(job, targets)
                return True
            now = time.monotonic()
            self._pending.append(_Pending(job, targets, now + self.timeout_s, now))
            self._lock.notify_all()
            return False

    def release(self, job: Job) -> None:
        """The job finished: unpin its slots (idempotent per job: its rows are cleared)."""
        with self._lock:
            rows, job.rows = job.rows, []
            for slot, _ in rows:
                self.slots.unpin(slot)
            self._pending = [p for p in self._pending if p.job is not job]
            self._lock.notify_all()  # a waiting job may fit now

    def pin_forever(self, adapter_ids: list[str]) -> None:
        """Load `adapter_ids` now and keep them resident (settings.pinned_adapters)."""
        for adapter_id in adapter_ids:
            adapter = self.host.get(adapter_id)
            with self.model_lock, self._lock:
                if adapter_id not in self.slots:
                    self._write("adapter", adapter)
                self.slots.pin(adapter_id)
                self._pinned_forever.add(adapter_id)

    def retire(self, adapter_id: str) -> None:
        """An adapter left the store, or a merge left the cache: free its slot once idle."""
        with self.model_lock, self._lock:
            if adapter_id in self._pinned_forever:
                self._pinned_forever.discard(adapter_id)
                self.slots.unpin(self.slots.slot_of(adapter_id))  # type: ignore[arg-type]
            self.slots.retire(adapter_id)

    # --- the loader -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._pending:
                    self._lock.wait()
                if self._stopped:
                    return
                pending = list(self._pending)
            progressed = False
            for entry in pending:
                try:
                    progressed |= self._try(entry)
                except Exception as exc:  # a bug: fail this request, keep the loader alive
                    log.exception("placing %s failed", entry.job.request.request_id)
                    progressed |= self._leave(entry, GenerationError(
                        f"placing the request's adapters failed ({type(exc).__name__}); "
                        "see the server log"))
            if not progressed:
                with self._lock:  # nothing fits: wait for a release, or the next deadline
                    if self._pending and not self._stopped:
                        soonest = min(p.deadline for p in self._pending)
                        self._lock.wait(max(0.0, min(soonest - time.monotonic(), 0.5)))

    def _try(self, entry: _Pending) -> bool:
        """Place one waiting job if it can be; True if it left the waiting list."""
        job = entry.job
        if job.finished or job.stream.cancelled:
            return self._leave(entry, None)
        if time.monotonic() > entry.deadline:
            return self._leave(entry, AdapterPlacementError(
                f"the request's adapters could not be placed on the device within "
                f"{self.timeout_s:g} s (every slot is in use); retry later"))
        with self._lock:
            missing = [t for t in entry.targets if t.adapter_id not in self.slots]
            if not self._fits(entry.targets, missing):
                return False
        try:
            loaded = {t.adapter_id: t.virtual or self.host.get(t.adapter_id) for t in missing}
        except AdapterError as exc:
            return self._leave(entry, AdapterPlacementError(f"loading an adapter failed: {exc}"))
        except Exception as exc:  # an I/O error: this request fails, the loader goes on
            log.exception("loading adapters for %s failed", job.request.request_id)
            return self._leave(entry, GenerationError(
                f"loading an adapter failed ({type(exc).__name__}); see the server log"))
        with self.model_lock, self._lock:
            if job.finished or entry not in self._pending:
                return True
            missing = [t for t in entry.targets if t.adapter_id not in self.slots]
            if not self._fits(entry.targets, missing):
                return False  # someone took the room meanwhile
            # Pin what is resident first and each new one as it lands, so that making room
            # for one of the job's adapters never evicts another of them.
            slots = {t.adapter_id: self.slots.pin(t.adapter_id) for t in entry.targets
                     if t.adapter_id in self.slots}
            for target in missing:
                started = time.perf_counter()
                self._write(target.pool, loaded[target.adapter_id])
                slots[target.adapter_id] = self.slots.pin(target.adapter_id)
                metrics.ADAPTER_LOAD_SECONDS.labels(tier="device").observe(
                    time.perf_counter() - started)
            self._placed(job, [(slots[t.adapter_id], t.weight) for t in entry.targets])
            self._pending.remove(entry)
        metrics.PLACEMENT_WAIT_SECONDS.observe(time.monotonic() - entry.since)
        self.wake()
        return True

    def _fits(self, targets: tuple[Target, ...], missing: list[Target]) -> bool:
        """Whether the missing adapters can get slots without evicting one this job uses."""
        for pool in ("adapter", "virtual"):
            need = sum(1 for t in missing if t.pool == pool)
            if need == 0:
                continue
            # Idle resident adapters of this very job must not be evicted for its others.
            kept = sum(1 for t in targets if t.pool == pool and t.adapter_id in self.slots
                       and self.slots.refs(t.adapter_id) == 0)
            if self.slots.available(pool) - kept < need:
                return False
        return True

    def _write(self, pool: Pool, adapter) -> None:
        slot, evicted = self.slots.claim(pool)
        if evicted is not None:
            metrics.ADAPTER_EVICTIONS.labels(tier="device").inc()
        self.slots.write(slot, adapter)
        metrics.ADAPTER_LOADS.labels(tier="device").inc()

    def _pin_all(self, job: Job, targets: tuple[Target, ...]) -> None:
        self._placed(job, [(self.slots.pin(t.adapter_id), t.weight) for t in targets])

    @staticmethod
    def _placed(job: Job, rows: list[tuple[int, float]]) -> None:
        job.rows = rows
        job.placed = True
        job.stream.mark_placed()

    def _leave(self, entry: _Pending, error: Exception | None) -> bool:
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)
        if error is not None:
            entry.job.placement_error = error  # type: ignore[assignment]
        self.wake()
        return True
