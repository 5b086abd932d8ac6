"""The engine: base model + blended LoRA layers + router, driven by one worker thread.

Contract (what the server uses; nothing here knows HTTP):
    load()                     base, adapters, index; warm-up; then `ready`
    route(text, options)       the routing decision alone
    submit(request, loop)      admit a request -> GenerationStream (events, cancel)
    register_adapter(id) / unregister_adapter(id)
    stats(), drain(), shutdown()
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from adapters.blend import AUTO_MODEL, BASE_MODEL, Blend, blend_for
from adapters.errors import AdapterNotFoundError, IncompatibleAdapterError
from adapters.registry import list_store, load_adapter
from adapters.virtual import VirtualAdapter
from app import metrics
from app.engine.adapter_bank import AdapterBank
from app.engine.base_model import load_base_model
from app.engine.blended_lora import BlendContext, install_blended_layers
from app.engine.merging import Merging, task_inputs_collector
from app.engine.scheduler import Job, Scheduler
from app.engine.stream import GenerationStream
from app.engine.types import (
    Admission,
    ContextLengthExceededError,
    EngineNotReadyError,
    EngineOverloadedError,
    GenerationRequest,
)
from app.settings import Settings
from router_index.embedder import Embedder
from router_index.router import RouteDecision, Router, RoutingOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    ready: bool
    draining: bool
    queued: int
    running: int
    adapters: tuple[str, ...]
    device: str
    dtype: str


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = False
        self.draining = False
        self._model_lock = threading.RLock()  # held by every forward and every slot write
        self._admit_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._in_flight = 0  # admitted and not finished
        self._slot_refs: Counter[int] = Counter()  # running requests per slot
        self._retired_slots: list[str] = []  # unregistered, cleared once nobody uses them
        self._evicted: set[str] = set()  # virtual adapters evicted before they were placed
        self._worker: threading.Thread | None = None
        self._idle = threading.Condition()

    # --- start-up -------------------------------------------------------------------------
    def load(self, show_progress: bool = True) -> None:
        """Load base, adapters and router index; warm up; start the worker; become ready."""
        s = self.settings
        torch.set_num_threads(self.threads)
        self.model, self.tokenizer, self.device, self.dtype = load_base_model(s)
        self.context = BlendContext()
        slots = s.max_adapters + s.max_virtual_adapters
        layers = install_blended_layers(self.model, set(s.lora_target_modules), self.context, slots)
        self.bank = AdapterBank(layers, slots)
        self.merging = Merging(s, self.bank, task_inputs_collector(self), self._retire)
        self.router = Router(Embedder(s.embedder_path), routing_defaults(s))
        ids = s.adapters if s.adapters is not None else list_store(s.adapter_store)
        shapes = self.bank.base_shapes()
        for adapter_id in ids:
            self.bank.add(load_adapter(s.adapter_store, adapter_id, shapes, self.dtype))
        self.router.build(
            {a.id: a.exemplars for a in self.bank.adapters.values()}, show_progress=show_progress
        )
        if s.fallback_adapter is not None and s.fallback_adapter not in self.bank:
            raise AdapterNotFoundError(f"fallback adapter {s.fallback_adapter!r} is not loaded")
        self.eos_ids = self._eos_ids()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._worker = threading.Thread(target=self._work, name="dynamerge-engine", daemon=True)
        self._worker.start()
        self._warm_up()
        self.ready = True
        log.info("engine ready: %d adapters on %s", len(self.bank.ids()), self.device)

    def _eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return frozenset(i for i in ids if i is not None)

    def _warm_up(self) -> None:
        for model in [BASE_MODEL, *self.bank.ids()[:1]]:
            prompt = self.render_chat([{"role": "user", "content": "Hi"}])
            request = GenerationRequest(prompt=prompt, route_text="Hi", model=model)
            self._admit(request, None, check_ready=False).result()

    # --- requests -------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, through the base model's chat template."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def models(self) -> list[str]:
        return [AUTO_MODEL, BASE_MODEL, *self.adapter_ids()]

    def adapter_ids(self) -> list[str]:
        """Adapters requests may use (those being unregistered are gone already)."""
        return [a for a in self.bank.ids() if a not in self._retired_slots]

    def route(self, text: str, options: RoutingOptions | None = None) -> RouteDecision:
        decision = self.router.route(text, options)
        metrics.ROUTING_LATENCY.observe(decision.latency_s)
        return decision

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> GenerationStream:
        """Route and admit a request; raises an EngineError / AdapterError if it can't run."""
        return self._admit(request, loop, check_ready=True)

    def _admit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None, check_ready: bool
    ) -> GenerationStream:
        if check_ready and (not self.ready or self.draining):
            raise EngineNotReadyError("the server is not ready" if not self.ready else "draining")
        if request.model not in (AUTO_MODEL, BASE_MODEL) and request.model not in set(
            self.adapter_ids()
        ):
            raise AdapterNotFoundError(f"model {request.model!r} does not exist")
        prompt_ids = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        needed = len(prompt_ids) + request.sampling.max_tokens
        if needed > self.context_length:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.context_length} tokens; the "
                f"request needs {needed} ({len(prompt_ids)} in the prompt + "
                f"{request.sampling.max_tokens} to generate)"
            )
        if not request.merge.is_linear:
            self.merging.options(request.merge)  # a bad method or parameter fails fast
        decision = None
        if request.mix is not None:
            blend = self._explicit_mix(request)
        else:
            if request.model == AUTO_MODEL:
                decision = self.route(request.route_text, request.routing)
                _observe_decision(decision)
            blend = blend_for(request.model, decision, self.settings.fallback_adapter)
        targets, cache_hit = blend, None
        if blend and not request.merge.is_linear:
            virtual, cache_hit = self.merging.virtual_for(blend, request.merge)
            targets = ((virtual.id, 1.0),)
        with self._admit_lock:
            if self._in_flight >= self.settings.max_queue:
                raise EngineOverloadedError(
                    f"{self._in_flight} requests in flight; retry later"
                )
            with self._model_lock:  # slots cannot change while we pin them
                if cache_hit is not None and targets[0][0] not in self.bank:
                    self._place_virtual(virtual)
                rows = [(self.bank.slot_of(a), w) for a, w in targets]
                for slot, _ in rows:
                    self._slot_refs[slot] += 1
            self._in_flight += 1
            metrics.QUEUE_DEPTH.inc()
        admission = Admission(request.request_id, decision, blend, len(prompt_ids),
                              method=request.merge.method, cache_hit=cache_hit)
        stream = GenerationStream(admission, loop)
        self._queue.put(Job(request, prompt_ids, rows, stream, time.perf_counter()))
        return stream

    def _explicit_mix(self, request: GenerationRequest) -> Blend:
        if request.model != AUTO_MODEL:
            raise ValueError("an explicit adapter mix needs model 'auto'")
        known = set(self.adapter_ids())
        unknown = [a for a, _ in request.mix or () if a not in known]
        if unknown:
            raise AdapterNotFoundError(f"mix names unknown adapters: {unknown}")
        return tuple((a, float(w)) for a, w in request.mix or () if w != 0)

    def preview_merge(self, adapter_ids: list[str], max_modules: int = 24):
        """Interference statistics of merging `adapter_ids` (see adapters.merge.preview)."""
        known = set(self.adapter_ids())
        unknown = [a for a in adapter_ids if a not in known]
        if unknown:
            raise AdapterNotFoundError(f"unknown adapters: {unknown}")
        if not adapter_ids:
            raise ValueError("preview needs at least one adapter")
        return self.merging.preview(adapter_ids, max_modules)

    # --- adapters -------------------------------------------------------------------------
    def register_adapter(self, adapter_id: str) -> None:
        """Load `adapter_id` from the store into a free slot and index its exemplars, live."""
        adapter = load_adapter(
            self.settings.adapter_store, adapter_id, self.bank.base_shapes(), self.dtype
        )
        if not adapter.exemplars:
            raise IncompatibleAdapterError(f"adapter {adapter_id!r} has no exemplars.jsonl")
        with self._model_lock:
            self._reap_retired()
            if adapter_id in self.bank:
                raise IncompatibleAdapterError(f"adapter {adapter_id!r} is already registered")
            self.bank.add(adapter)
        self.merging.forget(adapter_id)  # set-dependent preparations must see the new task
        self.router.add_task(adapter_id, adapter.exemplars)

    def unregister_adapter(self, adapter_id: str) -> None:
        """Stop routing to `adapter_id` now; free its slot once no running request uses it."""
        with self._model_lock:
            if adapter_id in self._retired_slots:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            slot = self.bank.slot_of(adapter_id)
            self.router.remove_task(adapter_id)
            self._retired_slots.append(adapter_id)
            if self._slot_refs[slot] == 0:
                self._reap_retired()
        self.merging.forget(adapter_id)

    def _place_virtual(self, virtual: VirtualAdapter) -> None:
        """Put a merged adapter in a slot (under the model lock); if the cache no longer holds
        it (evicted meanwhile), retire it at once so it leaves with its last request."""
        self._reap_retired()
        self.bank.add_virtual(virtual)
        if virtual.id in self._evicted:
            self._evicted.discard(virtual.id)
            self._retired_slots.append(virtual.id)

    def _retire(self, adapter_id: str) -> None:
        """The merge cache evicted a virtual adapter: free its slot once nobody uses it."""
        with self._model_lock:
            if adapter_id not in self.bank:
                self._evicted.add(adapter_id)  # not placed yet: retire it when it is
            elif adapter_id not in self._retired_slots:
                self._retired_slots.append(adapter_id)
                self._reap_retired()

    def _reap_retired(self) -> None:
        for adapter_id in list(self._retired_slots):
            if self._slot_refs[self.bank.slot_of(adapter_id)] == 0:
                self.bank.remove(adapter_id)
                self._retired_slots.remove(adapter_id)

    # --- the worker -----------------------------------------------------------------------
    @property
    def threads(self) -> int:
        """torch intra-op threads of the engine (see Settings.torch_threads)."""
        return self.settings.torch_threads or max(1, (os.cpu_count() or 1) // 2)

    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # this thread runs every forward pass
        Scheduler(
            self.model, self.context, self.tokenizer, self.eos_ids, self._model_lock,
            self.settings.max_batch_size, self._release,
        ).run(self._queue)

    def _release(self, job: Job) -> None:
        """A request left the engine: unpin its slots, free retired ones, wake drainers."""
        with self._model_lock:
            for slot, _ in job.rows:
                self._slot_refs[slot] -= 1
            self._reap_retired()
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    # --- lifecycle ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            ready=self.ready, draining=self.draining, queued=self._queue.qsize(),
            running=max(self._in_flight - self._queue.qsize(), 0),
            adapters=tuple(self.adapter_ids()) if self.ready else (),
            device=str(getattr(self, "device", "")), dtype=str(getattr(self, "dtype", "")),
        )

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, wait for those in flight. True if all finished in time."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
            self._worker = None


def routing_defaults(settings: Settings) -> RoutingOptions:
    """The server's routing options: settings, overridden by a calibration file if given."""
    values: dict[str, object] = {
        "top_k": settings.top_k, "temperature": settings.temperature,
        "threshold": settings.threshold, "scoring": settings.scoring,
        "sharpening": settings.sharpening, "renormalize": settings.renormalize,
        "knn_m": settings.knn_m,
    }
    if settings.calibration_file is not None:
        calibrated = json.loads(settings.calibration_file.read_text(encoding="utf-8"))
        values.update({k: calibrated[k] for k in values if calibrated.get(k) is not None})
        log.info("routing calibrated from %s: %s", settings.calibration_file, values)
    return RoutingOptions(**values)


def _observe_decision(decision: RouteDecision) -> None:
    metrics.ROUTE_TOP_SCORE.observe(decision.top_score)
    if decision.fallback:
        metrics.FALLBACKS.inc()
    for hit in decision.hits:
        metrics.ROUTING_DECISIONS.labels(adapter=hit.adapter_id).inc()


__all__ = ["Blend", "Engine", "EngineStats"]
