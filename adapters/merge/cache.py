"""LRU cache of virtual adapters (merged deltas), bounded by bytes, thread-safe.

Keyed by (sorted adapter ids, weights rounded to a step, method name, frozen params): two
requests whose router weights differ by less than half a step share one merge. Build from
`key.weights` (the rounded weights), not the request's raw ones, so that a cached value is a
function of its key alone, whichever request built it.

Metrics are the app's business: it passes callbacks (`on_hit`, `on_miss`, `on_evict`,
`on_build`); nothing here imports Prometheus.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor

V = TypeVar("V")


@dataclass(frozen=True)
class VirtualKey:
    """Identity of one merged result."""

    adapter_ids: tuple[str, ...]  # sorted
    weight_steps: tuple[int, ...]  # weights as multiples of `step`, aligned with adapter_ids
    step: float  # rounding step of the weights, > 0
    method: str  # name in MERGE_METHODS
    params: Hashable  # the method's frozen params dataclass

    @property
    def weights(self) -> tuple[float, ...]:
        """The rounded weights, aligned with `adapter_ids`: build the merge from these."""
        return tuple(n * self.step for n in self.weight_steps)


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int | float) or not (
            math.isfinite(step) and step > 0):
        raise ValueError(f"weight_step must be a finite number > 0, got {step!r}")


def make_key(adapter_ids: Sequence[str], weights: Sequence[float], method: str,
             params: Hashable, step: float) -> VirtualKey:
    """Round weights to `step` and sort ids together with their weights.

    Raises:
        ValueError: on mismatched lengths, duplicate ids, non-finite weights, unhashable
            params or a non-positive step.
    """
    _check_step(step)
    if len(adapter_ids) != len(weights):
        raise ValueError(f"{len(adapter_ids)} adapter ids for {len(weights)} weights")
    if len(set(adapter_ids)) != len(adapter_ids):
        raise ValueError(f"duplicate adapter ids in {list(adapter_ids)}")
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    try:
        hash(params)
    except TypeError:
        raise ValueError(f"params must be hashable (a frozen dataclass), got {params!r}") from None
    pairs = sorted(zip(adapter_ids, (round(float(w) / step) for w in weights), strict=True))
    return VirtualKey(tuple(i for i, _ in pairs), tuple(n for _, n in pairs), float(step),
                      method, params)


def tensor_nbytes(value: Any) -> int:
    """Bytes of the tensors in `value` (a tensor, or tuples/lists/dicts/dataclasses of them).

    A tensor reachable twice (e.g. Twin's shared expert) is counted once.
    """
    seen: set[int] = set()

    def walk(v: Any) -> int:
        if isinstance(v, Tensor):
            if id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, list | tuple):
            return sum(walk(x) for x in v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return sum(walk(getattr(v, f.name)) for f in dataclasses.fields(v))
        return 0

    return walk(value)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int  # removals for room only (not invalidate / clear)
    build_seconds: float  # cumulative wall time spent in build callbacks
    bytes_used: int
    budget_bytes: int
    entries: int


class VirtualAdapterCache(Generic[V]):
    """LRU of merged results with a memory budget in bytes.

    - `get_or_build(key, build)`: a hit returns the cached value and moves it to the front;
      a miss runs `build()` outside the lock (other keys stay servable meanwhile), inserts
      the value, and evicts least-recently-used entries until the budget holds. Concurrent
      misses on one key build once: the others wait and then hit.
    - A value larger than the whole budget is returned but not cached (nothing is evicted
      for it).
    - `max_entries` bounds the count as well: each cached merge holds an adapter slot, and
      slots run out long before bytes do for small (truncated-SVD) merges.
    - Callbacks run outside the lock: `on_hit(key)`, `on_miss(key)`, `on_evict(key, value)`,
      `on_build(key, seconds)`.
    """

    def __init__(self, budget_bytes: int, *, weight_step: float = 0.01,
                 size_of: Callable[[V], int] = tensor_nbytes,
                 max_entries: int | None = None,
                 on_hit: Callable[[VirtualKey], None] | None = None,
                 on_miss: Callable[[VirtualKey], None] | None = None,
                 on_evict: Callable[[VirtualKey, V], None] | None = None,
                 on_build: Callable[[VirtualKey, float], None] | None = None) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        _check_step(weight_step)
        if max_entries is not None and (
                isinstance(max_entries, bool) or not isinstance(max_entries, int)
                or max_entries < 1):
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self.weight_step = float(weight_step)
        self._size_of = size_of
        self._on_hit, self._on_miss, self._on_evict, self._on_build = (
            on_hit, on_miss, on_evict, on_build)
        self._lock = threading.Lock()
        self._entries: OrderedDict[VirtualKey, tuple[V, int]] = OrderedDict()  # MRU last
        self._building: dict[VirtualKey, threading.Event] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._build_seconds = 0.0

    def key(self, adapter_ids: Sequence[str], weights: Sequence[float], method: str,
            params: Hashable) -> VirtualKey:
        """`make_key` with this cache's weight step."""
        return make_key(adapter_ids, weights, method, params, self.weight_step)

    def get_or_build(self, key: VirtualKey, build: Callable[[], V]) -> tuple[V, bool]:
        """The cached value for `key`, or `build()`'s result (cached if it fits).

        Returns:
            (value, hit): hit is True when no build ran for this call.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    break
                waiting = self._building.get(key)
                if waiting is None:
                    self._misses += 1
                    done = self._building[key] = threading.Event()
                    entry = None
                    break
            waiting.wait()  # another thread builds this key; then look again
        if entry is not None:
            self._call(self._on_hit, key)
            return entry[0], True
        self._call(self._on_miss, key)
        try:
            start = time.perf_counter()
            value = build()
            seconds = time.perf_counter() - start
            evicted = self._insert(key, value, seconds)
        finally:
            with self._lock:
                self._building.pop(key, None)
            done.set()
        self._call(self._on_build, key, seconds)
        for k, v in evicted:
            self._call(self._on_evict, k, v)
        return value, False

    def _insert(self, key: VirtualKey, value: V, seconds: float) -> list[tuple[VirtualKey, V]]:
        size = self._size_of(value)
        evicted: list[tuple[VirtualKey, V]] = []
        with self._lock:
            self._build_seconds += seconds
            if size > self.budget_bytes:
                return evicted
            while self._entries and (self._bytes + size > self.budget_bytes or (
                    self.max_entries is not None and len(self._entries) >= self.max_entries)):
                k, (v, s) = self._entries.popitem(last=False)
                self._bytes -= s
                self._evictions += 1
                evicted.append((k, v))
            self._entries[key] = (value, size)
            self._bytes += size
        return evicted

    def invalidate(self, adapter_id: str) -> list[tuple[VirtualKey, V]]:
        """Drop every entry that merges `adapter_id` (it was removed or replaced).

        Returns:
            The removed (key, value) pairs, so the caller can free what they hold.
        """
        with self._lock:
            gone = [k for k in self._entries if adapter_id in k.adapter_ids]
            return [(k, self._pop(k)) for k in gone]

    def clear(self) -> list[tuple[VirtualKey, V]]:
        """Drop every entry; returns the removed (key, value) pairs."""
        with self._lock:
            return [(k, self._pop(k)) for k in list(self._entries)]

    def _pop(self, key: VirtualKey) -> V:
        value, size = self._entries.pop(key)
        self._bytes -= size
        return value

    def values(self) -> list[V]:
        """The cached values, least recently used first (a snapshot)."""
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._build_seconds,
                              self._bytes, self.budget_bytes, len(self._entries))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is not None:
            callback(*args)
