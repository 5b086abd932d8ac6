"""The host tier: adapters whose tensors are in CPU memory, least recently used out first.

Bounded in bytes. On CUDA the tensors sit in pinned (page-locked) memory, so that the copy to
a device slot is a fast DMA. An adapter larger than the whole budget is loaded and handed out
but not kept. Concurrent misses on one adapter read it from disk once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters.registry import LoraAdapter, LoraModule


@dataclass(frozen=True)
class HostCacheStats:
    adapters: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int


class HostCache:
    """An LRU of loaded adapters bounded by `budget_bytes`.

    Args:
        budget_bytes: most bytes of tensors kept.
        load: reads one adapter from disk (the disk tier's `load`).
        pin_memory: put the tensors in page-locked memory (CUDA only).
        on_load: called with (adapter id, seconds) after each read from disk.
        on_evict: called with the adapter id of each eviction.
    """

    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[str], LoraAdapter],
        pin_memory: bool = False,
        on_load: Callable[[str, float], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self._load = load
        self._pin = pin_memory
        self._on_load = on_load or (lambda _id, _s: None)
        self._on_evict = on_evict or (lambda _id: None)
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._hits = self._misses = self._evictions = 0

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._entries

    def ids(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, adapter_id: str) -> LoraAdapter:
        """The adapter's tensors, from memory or read from disk now."""
        with self._lock:
            found = self._touch(adapter_id)
            if found is not None:
                return found
            gate = self._loading.setdefault(adapter_id, threading.Lock())
        with gate:  # one read per adapter, however many ask at once
            with self._lock:
                found = self._touch(adapter_id)
                if found is not None:
                    return found
                self._misses += 1
            started = time.perf_counter()
            adapter = self._pinned(self._load(adapter_id)) if self._pin else self._load(adapter_id)
            self._on_load(adapter_id, time.perf_counter() - started)
            with self._lock:
                self._loading.pop(adapter_id, None)
                self._keep(adapter)
        return adapter

    def drop(self, adapter_id: str) -> None:
        """Forget an adapter (removed from the store, or replaced)."""
        with self._lock:
            adapter = self._entries.pop(adapter_id, None)
            if adapter is not None:
                self._bytes -= adapter.nbytes()

    def stats(self) -> HostCacheStats:
        with self._lock:
            return HostCacheStats(len(self._entries), self._bytes, self.budget_bytes,
                                  self._hits, self._misses, self._evictions)

    def _touch(self, adapter_id: str) -> LoraAdapter | None:
        found = self._entries.get(adapter_id)
        if found is not None:
            self._entries.move_to_end(adapter_id)
            self._hits += 1
        return found

    def _keep(self, adapter: LoraAdapter) -> None:
        size = adapter.nbytes()
        if size > self.budget_bytes:
            return
        self._entries[adapter.id] = adapter
        self._bytes += size
        while self._bytes > self.budget_bytes:
            evicted_id, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes()
            self._evictions += 1
            self._on_evict(evicted_id)

    @staticmethod
    def _pinned(adapter: LoraAdapter) -> LoraAdapter:
        modules = {
            name: LoraModule(A=m.A.pin_memory(), B=m.B.pin_memory(), scaling=m.scaling)
            for name, m in adapter.modules.items()
        }
        return LoraAdapter(adapter.id, adapter.path, modules, adapter.exemplars)
