"""Per-request merge methods for the engine: validate, build or reuse a virtual adapter, preview.

`linear` (task arithmetic, TR-Merging's Eq. 9) needs none of this: the blended layers compute
it exactly. Every other method's result is cached as a virtual adapter, keyed by (sorted
adapter ids, weights rounded to a step, method, params, storage).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from adapters.merge import VirtualAdapterCache, VirtualKey, get_merge_method
from adapters.merge.preview import InterferencePreview, preview
from adapters.registry import LoraAdapter
from adapters.virtual import STORAGES, MergeFactory, MergeOptions, VirtualAdapter
from app import metrics
from app.engine.activations import TaskInputsCache, collect_task_inputs
from app.engine.base_model import base_model_path
from app.engine.blend import Blend
from app.engine.blended_lora import BlendedLoRALinear
from app.engine.types import EngineNotReadyError, InvalidRequestError, MergeSpec
from app.settings import Settings

log = logging.getLogger(__name__)


class MergeQueueFullError(EngineNotReadyError):
    """Every merge build slot and queue place is taken (503, with Retry-After); a request
    for a merge already being built never gets this: it waits for that build."""


class Merging:
    """Owns the merge factory and the virtual-adapter cache of one engine.

    Args:
        settings: the merge knobs.
        adapters: the store's adapters, read through the host tier (tensors on demand).
        layers: the blended layers (their base weights).
        collect_inputs: TE's exemplar activations, collected once when first needed.
        on_evict: a virtual adapter left the cache (its device slot may go).
    """

    def __init__(
        self,
        settings: Settings,
        adapters: Mapping[str, LoraAdapter],
        layers: Mapping[str, BlendedLoRALinear],
        collect_inputs: Callable[..., dict[str, dict[str, torch.Tensor]] | None],
        on_evict: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.adapters = adapters
        self.layers = layers
        self._on_evict = on_evict
        self._collect_inputs = collect_inputs
        self._inputs: dict[str, dict[str, torch.Tensor]] | None = None
        self._inputs_lock = threading.Lock()
        self._closing = threading.Event()
        self._warm_thread: threading.Thread | None = None
        # Builds run on `merge_max_builds` builder threads beside the decode loop, at a lower
        # scheduling priority (`merge_build_nice`) so that decode steps win the cores; at
        # most `merge_build_queue` more wait; beyond that a miss is refused with 503. Their
        # own threads, not the requests': a thread's niceness cannot be raised back.
        self._builders = ThreadPoolExecutor(
            settings.merge_max_builds, thread_name_prefix="merge-build",
            initializer=_lower_priority, initargs=(settings.merge_build_nice,))
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._mean_build_s = 1.0
        self.factory = MergeFactory(
            adapters, self._base_weight, self.task_inputs, settings.merge_prepared_bytes,
            half_sets=settings.merge_half_sets, set_budget_bytes=settings.merge_set_bytes,
        )
        self.cache: VirtualAdapterCache[VirtualAdapter] = VirtualAdapterCache(
            settings.merge_cache_bytes,
            weight_step=settings.merge_weight_step,
            size_of=VirtualAdapter.nbytes,
            max_entries=settings.max_virtual_adapters,
            on_hit=lambda _key: metrics.MERGE_CACHE_HITS.inc(),
            on_miss=lambda _key: metrics.MERGE_CACHE_MISSES.inc(),
            on_evict=lambda _key, value: (metrics.MERGE_CACHE_EVICTIONS.inc(),
                                          on_evict(value.id)),
            on_build=lambda key, seconds: metrics.MERGE_BUILD_SECONDS.labels(
                method=key.method).observe(seconds),
        )

    def options(self, spec: MergeSpec) -> MergeOptions:
        """Validated options of a request's merge.

        Raises:
            MergeParameterError: an unknown method, or a bad parameter of it (named).
            InvalidRequestError: a bad storage or rank.
        """
        method = get_merge_method(spec.method)
        storage = spec.storage or self.settings.merge_storage
        if storage not in STORAGES:
            raise InvalidRequestError(f"merge.storage must be one of {', '.join(STORAGES)}",
                                      param="merge.storage")
        rank = spec.rank if spec.rank is not None else self.settings.merge_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidRequestError("merge.rank must be an integer >= 1", param="merge.rank")
        return MergeOptions(params=method.params(**dict(spec.params)), storage=storage, rank=rank)

    def virtual_for(self, blend: Blend, spec: MergeSpec) -> tuple[VirtualAdapter, bool]:
        """The merged adapter for `blend` under `spec`, from the cache or built now."""
        options = self.options(spec)
        ids = [a for a, _ in blend]
        key = self.cache.key(ids, [w for _, w in blend], spec.method, options)
        return self.cache.get_or_build(key, lambda: self._build_bounded(key, options))

    def _build_bounded(self, key: VirtualKey, options: MergeOptions) -> VirtualAdapter:
        limit = self.settings.merge_max_builds + self.settings.merge_build_queue
        with self._pending_lock:
            if self._pending >= limit:
                wait = self._mean_build_s * (self._pending / self.settings.merge_max_builds)
                raise MergeQueueFullError(
                    f"{self._pending} merges are being built or waiting, the most this server "
                    "queues; retry later", retry_after_s=max(1.0, wait))
            self._pending += 1
        try:
            virtual = self._builders.submit(self._build, key, options).result()
            with self._pending_lock:  # a running mean, for Retry-After
                self._mean_build_s = 0.8 * self._mean_build_s + 0.2 * virtual.build_seconds
            return virtual
        finally:
            with self._pending_lock:
                self._pending -= 1

    def build_static(self, blend: Blend, spec: MergeSpec) -> VirtualAdapter:
        """A merge built outside the cache and the slots (static exports)."""
        options = self.options(spec)
        key = self.cache.key([a for a, _ in blend], [w for _, w in blend], spec.method, options)
        return self._build(key, options)

    def forget(self, adapter_id: str) -> None:
        """An adapter left: drop cached merges and preparations that used it."""
        self.factory.forget(adapter_id)
        for _key, virtual in self.cache.invalidate(adapter_id):
            self._on_evict(virtual.id)
        with self._inputs_lock:
            self._inputs = None

    def preview(self, adapter_ids: Sequence[str], max_modules: int) -> InterferencePreview:
        """Interference statistics over up to `max_modules` evenly spaced modules."""
        modules = sorted({m for a in adapter_ids for m in self.adapters[a].modules},
                         key=_module_order)
        step = max(1, len(modules) // max_modules)
        chosen = modules[::step][:max_modules]
        return preview(
            {m: self.factory.deltas(adapter_ids, m) for m in chosen},
            base_weights={m: self._base_weight(m) for m in chosen},
            task_inputs={m: self.task_inputs(adapter_ids, m) for m in chosen},
            adapter_ids=list(adapter_ids),
        )

    def warm_task_inputs(self) -> threading.Thread:
        """Collect TE's exemplar activations now, in a background thread (at start-up), so
        that the first TE merge does not wait for them. Returns the thread."""

        def run() -> None:
            try:
                with self._inputs_lock:
                    if self._inputs is None:
                        self._inputs = self._collect_inputs(stop=self._closing.is_set)
            except Exception:  # a request that needs them will collect (and fail) itself
                log.exception("collecting TE's exemplar activations failed")

        thread = threading.Thread(target=run, name="dynamerge-te-inputs", daemon=True)
        self._warm_thread = thread
        thread.start()
        return thread

    def close(self, timeout: float = 30.0) -> None:
        """Stop a background collection between two tasks and wait for it."""
        self._closing.set()
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)
        self._builders.shutdown(wait=False)

    def _build(self, key: VirtualKey, options: MergeOptions) -> VirtualAdapter:
        virtual = self.factory.build(key, options)
        log.info("built %s for %s in %.2f s (relative error %.4f)", virtual.id,
                 dict(zip(key.adapter_ids, key.weights, strict=True)), virtual.build_seconds,
                 virtual.relative_error)
        return virtual

    def _base_weight(self, module: str) -> torch.Tensor:
        return self.layers[module].weight.detach().float().cpu()

    def task_inputs(self, adapter_ids: Sequence[str], module: str) -> list[torch.Tensor]:
        """TE's exemplar inputs of `module`, per adapter; collected through the model once."""
        with self._inputs_lock:
            if self._inputs is None:
                self._inputs = self._collect_inputs()
            inputs = self._inputs
            assert inputs is not None
        return [inputs[module][a] for a in adapter_ids]


def _lower_priority(nice: int) -> None:
    """Raise this thread's niceness by `nice` (Linux: niceness is per thread, and threads it
    starts, such as an OpenMP team, inherit it)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: build at normal priority
        log.warning("merge builder threads keep their priority: %s", exc)


def _module_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def task_inputs_collector(engine) -> Callable[..., dict[str, dict[str, torch.Tensor]] | None]:
    """Collect TE's exemplar activations through `engine`'s model, task by task, from the
    disk cache (`TaskInputsCache` under `cache_dir`) where it has them. The model lock is
    held for one task at a time, so that decoding steps slip in between tasks."""
    settings = engine.settings
    disk = (TaskInputsCache(Path(settings.cache_dir) / "te_inputs", base_model_path(settings))
            if settings.embedding_cache else None)

    def render(text: str) -> str:
        return engine.render_chat([{"role": "user", "content": text}])

    def collect(stop: Callable[[], bool] = lambda: False
                ) -> dict[str, dict[str, torch.Tensor]] | None:
        per_task = settings.te_exemplars_per_task
        result: dict[str, dict[str, torch.Tensor]] = {name: {} for name in engine.layers}
        for task in engine.store.ids():
            if stop():  # shutting down: torch must not run in a thread at interpreter exit
                return None
            texts = list(engine.store.spec(task).exemplars)[:per_task]
            key = disk.key([render(t) for t in texts], per_task) if disk is not None else None
            found = disk.get(key) if disk is not None and key is not None else None
            if found is None or set(found) != set(engine.layers):
                with engine.model_lock:
                    found = {m: by_task[task] for m, by_task in collect_task_inputs(
                        engine.model, engine.layers, engine.tokenizer, render, {task: texts},
                        per_task).items()}
                if disk is not None and key is not None:
                    disk.put(key, found)
            for module, inputs in found.items():
                result[module][task] = inputs
        return result

    return collect
