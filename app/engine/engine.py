"""The engine: base model + blended LoRA layers + adapter tiers + router, driven by one worker.

It implements `EngineClient` (app/engine/protocol.py), which is all the HTTP service uses.

Admission (`submit`, in the caller's thread): tokenise, route over every adapter of the store,
build a merged adapter if the method needs one, then hand the job to the residency manager
(which pins its adapters at once or has the loader bring them in) and to the scheduler. The
worker thread runs the scheduler; if it ever fails beyond one request, the engine fails every
request it holds exactly once, turns dead, and `health()` says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adapters.errors import AdapterNotFoundError, IncompatibleAdapterError, RefusedAdapterError
from adapters.host_cache import HostCache
from adapters.merge.preview import InterferencePreview
from adapters.store import AdapterStore, HostAdapters
from adapters.virtual import VirtualAdapter
from app import metrics
from app.engine.base_model import load_base_model
from app.engine.blend import AUTO_MODEL, BASE_MODEL, Blend, blend_for
from app.engine.blended_lora import BlendContext, install_blended_layers
from app.engine.calibration import resolve as resolve_routing
from app.engine.calibration import settings_options
from app.engine.device_slots import DeviceSlots
from app.engine.kv_pool import pool_for
from app.engine.lean_decode import LeanDecoder, unsupported
from app.engine.merging import Merging, task_inputs_collector
from app.engine.prefix_cache import PrefixCache
from app.engine.protocol import AdapterInfo, EngineStats, Health, RefusedAdapter
from app.engine.residency import Residency, Target
from app.engine.scheduler import WAKE, Job, Scheduler
from app.engine.stream import GenerationStream
from app.engine.threads import DecodeThreads, Policy, omp_threads_sleep, usable_cores
from app.engine.types import (
    Admission,
    ContextLengthExceededError,
    EngineDeadError,
    EngineNotReadyError,
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
    MergeSpec,
)
from app.settings import Settings
from router_index.embedder import Embedder
from router_index.embedding_cache import EmbeddingCache, embedder_identity
from router_index.router import RouteDecision, Router, RoutingOptions

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = False
        self.draining = False
        self.dead_reason: str | None = None
        self.model_lock = threading.RLock()  # held by every forward and every slot write
        # One lock for admission, the in-flight count and death; drainers wait on it.
        self._lock = threading.Condition(threading.RLock())
        self._in_flight: set[Job] = set()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self.scheduler: Scheduler | None = None

    # --- start-up -------------------------------------------------------------------------
    def load(self, show_progress: bool = True) -> None:
        """Load base, layers, adapter tiers and router index; warm up; become ready."""
        s = self.settings
        torch.set_num_threads(self.threads)
        self.model, self.tokenizer, self.device, self.dtype = load_base_model(s)
        self.context = BlendContext()
        layers = install_blended_layers(self.model, s.lora_target_modules, self.context,
                                        s.max_adapters + s.max_virtual_adapters)
        self.layers = layers
        self.lean = self._lean_decoder()
        self.slots = DeviceSlots(layers, s.max_adapters, s.max_virtual_adapters)
        self._load_tiers(show_progress)
        self.merging = Merging(s, HostAdapters(self.store, self.host.get), layers,
                               task_inputs_collector(self), self.residency.retire)
        self._load_router(show_progress)
        for adapter_id in [s.fallback_adapter, *s.pinned_adapters]:
            if adapter_id is not None and adapter_id not in self.store:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} of the settings is not "
                                           "servable (see the refused adapters in the log)")
        self.eos_ids = self._eos_ids()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.residency.start()
        self.residency.pin_forever(list(s.pinned_adapters))
        self.kv_pool = pool_for(self.model, 1, self.context_length)
        self.kv_pool = pool_for(self.model, self._kv_slots(self.kv_pool.token_bytes),
                                self.context_length)
        self.prefix_cache = PrefixCache(s.prefix_cache_bytes, s.prefix_block_tokens)
        log.info("KV pool: %d slots of %d tokens (%.2f GiB reserved, pages mapped on use); "
                 "prefix cache %.2f GiB", self.kv_pool.slots, self.context_length,
                 self.kv_pool.capacity_bytes / 2**30, s.prefix_cache_bytes / 2**30)
        self.scheduler = Scheduler(
            self.model, self.context, self.tokenizer, self.eos_ids, self.model_lock,
            s.max_batch_size, s.max_step_tokens, self._release, self._constraint_for,
            s.prefill_threads, self.kv_pool, self.prefix_cache, self.lean,
            self._decode_threads(),
        )
        self._worker = threading.Thread(target=self._work, name="dynamerge-engine", daemon=True)
        self._worker.start()
        metrics.ENGINE_STATE.attach(self._snapshot)
        self._warm_up()
        self._ready = True
        if s.te_warm_inputs:
            self.merging.warm_task_inputs()
        log.info("engine ready: %d adapters in the store (%d refused), %d device slots, on %s",
                 len(self.store), len(self.store.refused), s.max_adapters, self.device)

    def _lean_decoder(self) -> LeanDecoder | None:
        """The lean decode forward where `decode_path` asks for it and the model allows it."""
        path = self.settings.decode_path
        reason = None if path == "transformers" else unsupported(self.model)
        if path == "auto" and reason is None and self.device.type != "cpu":
            # Measured and tested on CPU only: a GPU takes it when asked (`lean`).
            reason = f"auto on {self.device.type}: the lean path is checked on CPU only"
        if path == "lean" and reason is not None:
            raise ValueError(f"DYNAMERGE_DECODE_PATH=lean, but the model has {reason}")
        if path == "transformers" or reason is not None:
            log.info("decode path: transformers (%s)", reason or "DYNAMERGE_DECODE_PATH")
            return None
        log.info("decode path: lean (fused projections, app/engine/lean_decode.py)")
        return LeanDecoder(self.model, self.context)

    def _kv_slots(self, token_bytes: int) -> int:
        """Rows the KV pool holds: `kv_pool_bytes` (or 40% of the available memory) in slots
        of the whole context, at most `max_batch_size`, at least one."""
        slot_bytes = token_bytes * self.context_length
        budget = self.settings.kv_pool_bytes
        if budget is None:
            budget = int(0.4 * _available_bytes(self.device))
        return max(1, min(self.settings.max_batch_size, budget // slot_bytes))

    def _load_tiers(self, show_progress: bool) -> None:
        """The disk tier (validated from headers), the host LRU and the residency manager."""
        s = self.settings
        self.store = AdapterStore(s.adapter_store, self.slots.base_shapes(), self.dtype,
                                  on_refuse=self._forget,
                                  base_weight=lambda name: self.layers[name].weight)
        self.store.scan(s.adapters, show_progress=show_progress)
        self._reserve_slots()
        self.host = HostCache(
            s.host_adapter_bytes, self.store.load, pin_memory=self.device.type == "cuda",
            on_load=lambda _id, seconds: (
                metrics.ADAPTER_LOADS.labels(tier="host").inc(),
                metrics.ADAPTER_LOAD_SECONDS.labels(tier="host").observe(seconds)),
            on_evict=lambda _id: metrics.ADAPTER_EVICTIONS.labels(tier="host").inc(),
        )
        self.residency = Residency(self.slots, self.store, self.host, self.model_lock,
                                   lambda: self._queue.put(WAKE), s.placement_timeout_s)

    def _load_router(self, show_progress: bool) -> None:
        """Every routable adapter's exemplars indexed (embeddings from the cache when it has
        them), then the routing defaults: calibrated for this store unless pinned."""
        s = self.settings
        embedder = Embedder(s.embedder_path, threads=self.threads)
        cache = EmbeddingCache(
            s.cache_dir / "embeddings", embedder_identity(embedder.path, embedder.name,
                                                          embedder.dim),
        ) if s.embedding_cache else None
        self.router = Router(embedder, settings_options(s), cache, s.knn_approximate_above)
        routable = {a: self.store.spec(a).exemplars for a in self.store.ids()
                    if self.store.spec(a).exemplars}
        self.router.build(routable, show_progress=show_progress)
        self.router.defaults, self.calibration = resolve_routing(s, self.router)

    def _reserve_slots(self) -> None:
        """Size every layer's slot stacks for the largest rank that targets it in the store:
        the memory is needed the moment that adapter is used, and growing the stacks then
        would stall decoding while every slot is copied."""
        ranks: dict[str, int] = {}
        for adapter_id in self.store.ids():
            for module, (rank, _) in self.store.spec(adapter_id).modules.items():
                ranks[module] = max(ranks.get(module, 0), rank)
        for module, rank in ranks.items():
            self.layers[module].reserve(rank)
        per_slot = sum(rank * (layer.in_features + layer.out_features)
                       for module, rank in ranks.items()
                       for layer in [self.layers[module]]) * self.dtype.itemsize
        log.info("adapter slots: %d x %.1f MB (largest rank per layer reserved)",
                 self.slots.num_adapters + self.slots.num_virtual, per_slot / 2**20)

    def _eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return frozenset(i for i in ids if i is not None)

    def _warm_up(self) -> None:
        ids = self.store.ids()
        for model in [BASE_MODEL, *ids[:1]]:
            prompt = (self.render_chat([{"role": "user", "content": "Hi"}])
                      if self.tokenizer.chat_template is not None else "Hi")
            request = GenerationRequest(prompt=prompt, route_text="Hi", model=model)
            self._admit(request, None, check_ready=False).result()

    # --- state ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready and self.dead_reason is None

    def health(self) -> Health:
        if self.dead_reason is not None or (self._ready and not (
            self._worker is not None and self._worker.is_alive() and self.residency.alive
        )):
            return "dead"
        if self.draining:
            return "draining"
        return "ready" if self._ready else "loading"

    def stats(self) -> EngineStats:
        running = self.scheduler.active if self.scheduler is not None else 0
        with self._lock:
            in_flight = len(self._in_flight)
        return EngineStats(
            health=self.health(), queued=max(in_flight - running, 0), running=running,
            adapters=len(self.store) if self._ready else 0,
            device=str(getattr(self, "device", "")), dtype=str(getattr(self, "dtype", "")),
            dead_reason=self.dead_reason,
        )

    def models(self) -> list[str]:
        return [AUTO_MODEL, BASE_MODEL, *self.store.ids()]

    def adapter_ids(self) -> list[str]:
        """Servable adapters of the store, in store order."""
        return self.store.ids()

    def adapters(self) -> list[AdapterInfo]:
        with self.residency._lock:
            on_device = set(self.slots.resident("adapter"))
            refs = {a: self.slots.refs(a) for a in on_device}
        host = set(self.host.ids())
        pinned = set(self.settings.pinned_adapters)
        out = []
        for adapter_id in self.store.ids():
            spec = self.store.spec(adapter_id)
            tier = "device" if adapter_id in on_device else "host" if adapter_id in host \
                else "disk"
            out.append(AdapterInfo(
                id=adapter_id, tier=tier, rank=spec.rank, modules=len(spec.modules),
                bytes=spec.nbytes, exemplars=len(spec.exemplars),
                requests=max(refs.get(adapter_id, 0) - (adapter_id in pinned), 0),
                pinned=adapter_id in pinned,
            ))
        return out

    def refused_adapters(self) -> list[RefusedAdapter]:
        return [RefusedAdapter(a, reason) for a, reason in sorted(self.store.refused.items())]

    # --- requests -------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, through the base model's chat template.

        Raises:
            InvalidRequestError: the base model has no chat template (a base checkpoint such
                as GPT-2's or OPT's): it serves completions only.
        """
        if self.tokenizer.chat_template is None:
            raise InvalidRequestError(
                "the base model has no chat template, so it cannot serve chat; send the prompt "
                "as text to /v1/completions", param="messages")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def routing_options(self, **overrides: object) -> RoutingOptions:
        """The server's routing defaults with a request's overrides (validated)."""
        adapters = overrides.get("adapters")
        if adapters is not None:
            unknown = [a for a in adapters if a not in self.store]  # type: ignore[union-attr]
            refused = {a: self.store.refused[a] for a in unknown if a in self.store.refused}
            if refused:
                raise RefusedAdapterError(
                    "routing.adapters names adapters that were refused: "
                    + "; ".join(f"{a!r}: {why}" for a, why in refused.items()),
                    param="routing.adapters")
            if unknown:
                raise AdapterNotFoundError(
                    f"routing.adapters names adapters that are not loaded: {unknown}",
                    param="routing.adapters")
            overrides["adapters"] = tuple(adapters)  # type: ignore[arg-type]
        return self.router.options(**overrides)

    def merge_spec(
        self, method: str, params: dict[str, object], storage: object = None, rank: object = None
    ) -> MergeSpec:
        """A request's merge, validated against the method registry."""
        spec = MergeSpec(method=method, params=tuple(sorted(params.items())),
                         storage=storage, rank=rank)  # type: ignore[arg-type]
        if not spec.is_linear or params or storage is not None or rank is not None:
            self.merging.options(spec)
        return spec

    def route(self, text: str, options: RoutingOptions | None = None) -> RouteDecision:
        decision = self.router.route(text, options)
        metrics.ROUTING_LATENCY.observe(decision.latency_s)
        return decision

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (for logprobs): byte-level pieces decoded one by one."""
        return [self.tokenizer.decode([t]) for t in token_ids]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's raw bytes: a piece of a multi-byte character is its own bytes, not
        the U+FFFD its text decodes to (byte-level BPE; other tokenizers: UTF-8 of the text)."""
        decoder = _byte_decoder()
        out = []
        for token_id, piece in zip(token_ids, self.tokenizer.convert_ids_to_tokens(
                list(token_ids)), strict=True):
            if piece is not None and all(c in decoder for c in piece):
                out.append(bytes(decoder[c] for c in piece))
            else:
                out.append(self.tokenizer.decode([token_id]).encode())
        return out

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """The router's embeddings of `texts` and the tokens it read."""
        embedder = self.router.embedder
        return embedder.encode(texts), embedder.count_tokens(texts)

    @property
    def embedder_name(self) -> str:
        return self.router.embedder.name

    @property
    def embedding_dim(self) -> int:
        return self.router.embedder.dim

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> GenerationStream:
        """Route and admit a request; raises a typed error if it can't run."""
        return self._admit(request, loop, check_ready=True)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is None:
            return self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise InvalidRequestError(f"the prompt names token ids outside the vocabulary "
                                      f"(0..{self.vocab_size - 1})", param="prompt")
        return list(request.prompt_ids)

    def _admit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None, check_ready: bool
    ) -> GenerationStream:
        if check_ready:
            self._check_accepting()
            self.check_capacity()
        if request.model not in (AUTO_MODEL, BASE_MODEL) and request.model not in self.store:
            reason = self.store.refused.get(request.model)
            if reason is not None:
                raise RefusedAdapterError(f"adapter {request.model!r} is in the store but was "
                                          f"refused: {reason}", param="model")
            raise AdapterNotFoundError(f"model {request.model!r} does not exist", param="model")
        prompt_ids = self._prompt_ids(request)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        needed = len(prompt_ids) + request.sampling.max_tokens
        if needed > self.context_length:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.context_length} tokens; the "
                f"request needs {needed} ({len(prompt_ids)} in the prompt + "
                f"{request.sampling.max_tokens} to generate)", param="max_tokens",
            )
        if any(t >= self.vocab_size for t, _ in request.sampling.logit_bias):
            raise InvalidRequestError(f"logit_bias names token ids beyond the vocabulary "
                                      f"({self.vocab_size})", param="logit_bias")
        if not request.merge.is_linear:
            self.merging.options(request.merge)  # a bad method or parameter fails fast
        decision = None
        if request.mix is not None:
            blend = self._explicit_mix(request)
        else:
            if request.model == AUTO_MODEL:
                route_text = request.route_text or self.tokenizer.decode(prompt_ids)
                decision = self.route(route_text, request.routing)
                _observe_decision(decision)
            blend = blend_for(request.model, decision, self.settings.fallback_adapter)
        blend = _rounded(blend, self.settings.blend_weight_step)
        targets = tuple(Target(a, w) for a, w in blend)
        cache_hit = None
        if blend and not request.merge.is_linear:
            virtual, cache_hit = self.merging.virtual_for(blend, request.merge)
            targets = (Target(virtual.id, 1.0, virtual),)
        admission = Admission(request.request_id, decision, blend, len(prompt_ids),
                              method=request.merge.method, cache_hit=cache_hit)
        stream = GenerationStream(admission, loop)
        job = Job(request, prompt_ids, stream, time.perf_counter())
        with self._lock:
            if check_ready:
                self._check_accepting()
            if len(self._in_flight) >= self.settings.max_queue:
                raise EngineOverloadedError(
                    f"{len(self._in_flight)} requests in flight, the most this server "
                    "accepts; retry later")
            self.residency.admit(job, targets)
            self._in_flight.add(job)
            metrics.QUEUE_DEPTH.inc()
            self._queue.put(job)
        return stream

    def check_capacity(self, requests: int = 1) -> None:
        """Fail fast (429) when admitting `requests` more would pass the in-flight limit: an
        overloaded server must say so in milliseconds, before any routing or tokenising."""
        in_flight = len(self._in_flight)  # a read without the lock: admission re-checks
        if in_flight + requests > self.settings.max_queue:
            raise EngineOverloadedError(
                f"{in_flight} requests in flight, the most this server accepts; retry later")

    def _check_accepting(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if not self._ready:
            raise EngineNotReadyError("the server is still loading; retry shortly")
        if self.draining:
            raise EngineNotReadyError("the server is shutting down; retry on another replica")

    def _explicit_mix(self, request: GenerationRequest) -> Blend:
        if request.model != AUTO_MODEL:
            raise InvalidRequestError("an explicit adapter mix needs model 'auto'",
                                      param="model")
        unknown = [a for a, _ in request.mix or () if a not in self.store]
        if unknown:
            raise AdapterNotFoundError(f"mix names unknown adapters: {unknown}", param="mix")
        return tuple((a, float(w)) for a, w in request.mix or () if w != 0)

    def _constraint_for(self, request: GenerationRequest):
        if not request.sampling.json_object:
            return None
        from app.engine.json_constraint import JsonObjectConstraint, token_texts

        return JsonObjectConstraint(token_texts(self.tokenizer, self.vocab_size))

    def preview_merge(self, adapter_ids: Sequence[str], max_modules: int = 24
                      ) -> InterferencePreview:
        """Interference statistics of merging `adapter_ids` (see adapters.merge.preview)."""
        unknown = [a for a in adapter_ids if a not in self.store]
        if unknown:
            raise AdapterNotFoundError(f"unknown adapters: {unknown}", param="adapters")
        if not adapter_ids:
            raise InvalidRequestError("preview needs at least one adapter", param="adapters")
        return self.merging.preview(list(adapter_ids), max_modules)

    def static_merge(self, blend: Blend, spec: MergeSpec) -> VirtualAdapter:
        """A merge built outside the cache and the slots (`dynamerge merge` exports it)."""
        unknown = [a for a, _ in blend if a not in self.store]
        if unknown:
            raise AdapterNotFoundError(f"unknown adapters: {unknown}", param="adapters")
        return self.merging.build_static(blend, spec)

    # --- adapters -------------------------------------------------------------------------
    def register_adapter(self, adapter_id: str) -> None:
        """Validate `<store>/<adapter_id>` and route to it from now on (loaded when used)."""
        if adapter_id in self.store:
            raise IncompatibleAdapterError(f"adapter {adapter_id!r} is already registered",
                                           param="id")
        spec = self.store.add(adapter_id)
        if not spec.exemplars:
            self.store.remove(adapter_id)
            raise IncompatibleAdapterError(f"adapter {adapter_id!r} has no exemplars.jsonl",
                                           param="id")
        self.host.drop(adapter_id)  # a previous version's tensors must not be served
        self.merging.forget(adapter_id)  # set-dependent preparations must see the new task
        self.router.add_task(adapter_id, spec.exemplars)

    def unregister_adapter(self, adapter_id: str) -> None:
        """Stop routing to `adapter_id` now; free its slot once no running request uses it."""
        self.store.remove(adapter_id)
        self._forget(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        """An adapter is no longer served (removed, or refused once its tensors were read)."""
        self.router.remove_task(adapter_id)
        self.host.drop(adapter_id)
        self.merging.forget(adapter_id)
        self.residency.retire(adapter_id)
        if getattr(self, "prefix_cache", None) is not None:
            self.prefix_cache.forget_all()  # the id may come back with other weights

    # --- the worker -----------------------------------------------------------------------
    @property
    def threads(self) -> int:
        """torch intra-op threads of the engine (see Settings.torch_threads)."""
        return self.settings.torch_threads or max(1, (os.cpu_count() or 1) // 2)

    def _decode_threads(self) -> Callable[[], int]:
        """The decode steps' thread count (Settings.decode_threads): fixed, every usable core
        (unset, when OpenMP threads sleep between regions), or the `auto` policy between
        `threads` and every usable core."""
        chosen = self.settings.decode_threads
        if chosen == "auto":
            return DecodeThreads(Policy(low=self.threads,
                                        high=max(self.threads, usable_cores())))
        if chosen is None:
            chosen = usable_cores() if omp_threads_sleep() else self.threads
        fixed = chosen
        return lambda: fixed

    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # this thread runs every forward pass
        assert self.scheduler is not None
        try:
            self.scheduler.run(self._queue)
        except BaseException as exc:  # a bug beyond one request: nothing can be trusted now
            log.critical("the engine worker failed; the engine is dead", exc_info=exc)
            self._die(f"{type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        """Fail every request held, once each, and refuse new ones (health turns dead)."""
        assert self.scheduler is not None
        with self._lock:
            self.dead_reason = reason
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job is not WAKE:
                    self.scheduler.waiting.append(job)
            self.scheduler.fail_everything(EngineDeadError(f"the engine is dead: {reason}"))

    def _release(self, job: Job) -> None:
        """A request left the engine: unpin its slots, wake drainers. Once per job."""
        self.residency.release(job)
        with self._lock:
            self._in_flight.discard(job)
            self._lock.notify_all()

    # --- lifecycle ------------------------------------------------------------------------
    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, wait for those in flight. True if all finished in time."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def shutdown(self) -> None:
        if getattr(self, "merging", None) is not None:
            self.merging.close()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
            self._worker = None
        if getattr(self, "residency", None) is not None:
            self.residency.stop()
        metrics.ENGINE_STATE.detach(self._snapshot)

    def _snapshot(self) -> metrics.EngineSnapshot:
        with self._lock:
            jobs = list(self._in_flight)
        started = [j for j in jobs if j.started]
        waiting = [j for j in jobs if not j.started]
        with self.residency._lock:
            device = tuple(self.slots.resident("adapter"))
        stats = self.host.stats()
        merges = self.merging.cache.stats()
        # The gateway protocol's "running" adapters are those loaded in device slots and ready
        # to serve (its LoRA-affinity scorer prefers a replica listing the request's adapter):
        # the slots, idle ones included, and every adapter of a started request (always in a
        # slot; listed first). vLLM lists only the latter; ours keep idle adapters resident.
        # "Waiting" ones are waiting to be loaded: admitted requests' adapters not in a slot.
        running_adapters = tuple(dict.fromkeys((*_adapters_of(started), *device)))
        return metrics.EngineSnapshot(
            max_lora=self.settings.max_adapters, running_adapters=running_adapters,
            waiting_adapters=tuple(a for a in _adapters_of(waiting) if a not in running_adapters),
            running=len(started), waiting=len(waiting), device=device,
            host=tuple(self.host.ids()), host_bytes=stats.bytes, disk=len(self.store),
            refused=len(self.store.refused), merge_entries=merges.entries,
            merge_bytes=merges.bytes_used, kv_slots=self.kv_pool.slots,
            kv_slots_used=self.kv_pool.in_use, kv_tokens_used=self.kv_pool.used_tokens,
            kv_bytes=self.kv_pool.capacity_bytes, prefix_bytes=self.prefix_cache.bytes_used,
        )


@functools.cache
def _rounded(blend: Blend, step: float) -> Blend:
    """Weights rounded to `step` (0: unchanged); adapters rounded to 0 leave the blend."""
    if step <= 0:
        return blend
    out = ((a, round(round(w / step) * step, 12)) for a, w in blend)
    return tuple((a, w) for a, w in out if w != 0)


def _available_bytes(device: torch.device) -> int:
    """Memory free for the KV pool now: the device's, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the other 68 are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _adapters_of(jobs: list[Job]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for job in jobs:
        seen.update(dict.fromkeys(a for a, _ in job.stream.admission.blend))
    return tuple(seen)


def _observe_decision(decision: RouteDecision) -> None:
    metrics.ROUTE_TOP_SCORE.observe(decision.top_score)
    if decision.fallback:
        metrics.FALLBACKS.inc()
    for hit in decision.hits:
        metrics.ROUTING_DECISIONS.labels(adapter=hit.adapter_id).inc()


__all__ = ["Blend", "Engine", "EngineStats"]
