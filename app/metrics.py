"""Every Prometheus metric of the server, defined once. Names carry the `dynamerge_` prefix."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

REQUESTS = Counter(
    "dynamerge_requests_total", "HTTP requests by endpoint, model and status",
    ["endpoint", "model", "status"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "dynamerge_time_to_first_token_seconds", "From admission to the first token",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "dynamerge_time_per_output_token_seconds", "Mean time between output tokens of a request",
    buckets=_FAST_BUCKETS,
)
E2E_LATENCY = Histogram(
    "dynamerge_e2e_latency_seconds", "From admission to the last token",
    buckets=_LATENCY_BUCKETS,
)
ROUTING_LATENCY = Histogram(
    "dynamerge_routing_latency_seconds", "Embedding plus index search per routed request",
    buckets=_FAST_BUCKETS,
)
PROMPT_TOKENS = Counter("dynamerge_prompt_tokens_total", "Prompt tokens processed")
GENERATION_TOKENS = Counter("dynamerge_generation_tokens_total", "Tokens generated")
ROUTING_DECISIONS = Counter(
    "dynamerge_routing_decisions_total", "Adapters chosen by routing, one per blended adapter",
    ["adapter"],
)
ROUTE_TOP_SCORE = Histogram(
    "dynamerge_route_top_score", "Best task score (mean cosine) of each routed request",
    buckets=(-0.2, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
FALLBACKS = Counter("dynamerge_routing_fallbacks_total", "Routed requests that fell back")
QUEUE_DEPTH = Gauge(
    "dynamerge_queue_depth", "Requests admitted and not started (waiting for adapters or a row)"
)
RUNNING_REQUESTS = Gauge("dynamerge_running_requests", "Requests being prefilled or decoded")
BATCH_SIZE = Histogram(
    "dynamerge_batch_size", "Sequences per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
FINISHED = Counter(
    "dynamerge_finished_requests_total", "Requests finished, by finish reason", ["reason"]
)
MERGE_CACHE_HITS = Counter("dynamerge_merge_cache_hits_total", "Virtual adapters reused")
MERGE_CACHE_MISSES = Counter("dynamerge_merge_cache_misses_total", "Virtual adapters built")
MERGE_CACHE_EVICTIONS = Counter(
    "dynamerge_merge_cache_evictions_total", "Virtual adapters evicted for room"
)
MERGE_BUILD_SECONDS = Histogram(
    "dynamerge_merge_build_seconds", "Time to build one virtual adapter, by method", ["method"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FORWARD_SECONDS = Histogram(
    "dynamerge_forward_seconds",
    "Time of one model forward pass of the engine, by phase (prefill chunks or a decode step)",
    ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECODE_PHASE_SECONDS = Histogram(
    "dynamerge_decode_phase_seconds",
    "Time of one decode step's phases: blend (the rows' mixes), inputs (tokens, positions,"
    " mask), forward (the model and its head), sample (logits to tokens), advance (stop checks,"
    " detokenising, stream events), bookkeeping (rows leaving, slots)",
    ["phase"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
             0.25, 0.5),
)
DECODE_THREADS = Gauge(
    "dynamerge_decode_threads", "torch threads of the latest decode step (DYNAMERGE_DECODE_THREADS)"
)
# vLLM's names, so dashboards and gateways built for it read ours (tokens, not requests).
PREFIX_CACHE_QUERIES = Counter("vllm:prefix_cache_queries",
                               "Prompt tokens looked up in the prefix cache")
PREFIX_CACHE_HITS = Counter("vllm:prefix_cache_hits",
                            "Prompt tokens whose states came from the prefix cache")
PREFIX_CACHE_EVICTIONS = Counter("dynamerge_prefix_cache_evictions_total",
                                 "Blocks evicted from the prefix cache (LRU, bytes)")
PREFILL_TOKENS_PER_STEP = Histogram(
    "dynamerge_prefill_tokens_per_step", "Prompt tokens prefilled by one engine step",
    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)

# --- adapter residency (disk -> host -> device) ---------------------------------------------
DEVICE_SLOT_LOOKUPS = Counter(
    "dynamerge_device_slot_lookups_total",
    "Adapters of admitted requests that were already in a device slot (hit) or not (miss)",
    ["result"],
)
ADAPTER_LOADS = Counter(
    "dynamerge_adapter_loads_total", "Adapters brought into a tier (host: read from disk)",
    ["tier"],
)
ADAPTER_EVICTIONS = Counter(
    "dynamerge_adapter_evictions_total", "Adapters evicted from a tier for room", ["tier"]
)
ADAPTER_LOAD_SECONDS = Histogram(
    "dynamerge_adapter_load_seconds",
    "Time to bring one adapter into a tier (host: disk to host; device: host to slot)",
    ["tier"], buckets=_FAST_BUCKETS,
)
PLACEMENT_WAIT_SECONDS = Histogram(
    "dynamerge_adapter_placement_wait_seconds",
    "Time an admitted request waited for its adapters to be placed on the device",
    buckets=_LATENCY_BUCKETS,
)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the scrape-time metrics read from the engine."""

    max_lora: int  # device slots for adapters
    running_adapters: tuple[str, ...]  # adapters in device slots, ready to serve
    waiting_adapters: tuple[str, ...]  # adapters of admitted requests, not in a slot yet
    running: int  # requests being generated
    waiting: int  # requests admitted, not started
    device: tuple[str, ...]  # adapters in device slots
    host: tuple[str, ...]  # adapters whose tensors are in host memory
    host_bytes: int
    disk: int  # servable adapters of the store
    refused: int  # adapters of the store refused at validation
    merge_entries: int = 0  # virtual adapters in the merge cache
    merge_bytes: int = 0
    kv_slots: int = 0  # rows the KV pool holds
    kv_slots_used: int = 0  # rows holding a slot (prefilling or decoding)
    kv_tokens_used: int = 0  # tokens with states in the pool
    kv_bytes: int = 0  # bytes reserved by the pool
    prefix_bytes: int = 0  # bytes of the prefix cache's blocks


class EngineStateCollector(Collector):
    """Gauges computed at scrape time from the engine's own state, so they never drift:
    adapter residency per tier and the model-server protocol that cluster routers read (the
    Kubernetes Gateway API inference extension: `vllm:lora_requests_info` for LoRA affinity,
    `vllm:num_requests_waiting` / `vllm:num_requests_running` for load)."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], EngineSnapshot]] = []

    def attach(self, source: Callable[[], EngineSnapshot]) -> None:
        """A loaded engine registers its state (the newest one is reported)."""
        self._sources.append(source)

    def detach(self, source: Callable[[], EngineSnapshot]) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def describe(self) -> list:
        return []  # collected lazily: the engine registers its source once it is loaded

    def collect(self):
        if not self._sources:
            return
        snap = self._sources[-1]()
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (value: the time of this sample)",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(snap.max_lora), ",".join(snap.running_adapters),
                         ",".join(snap.waiting_adapters)], time.time())
        yield info
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests being generated",
                                value=snap.running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests admitted, not started",
                                value=snap.waiting)
        resident = GaugeMetricFamily(
            "dynamerge_adapter_resident", "1 for each adapter resident in a tier",
            labels=["adapter", "tier"],
        )
        for adapter in snap.device:
            resident.add_metric([adapter, "device"], 1)
        for adapter in snap.host:
            resident.add_metric([adapter, "host"], 1)
        yield resident
        tiers = GaugeMetricFamily("dynamerge_tier_adapters", "Adapters per tier",
                                  labels=["tier"])
        tiers.add_metric(["device"], len(snap.device))
        tiers.add_metric(["host"], len(snap.host))
        tiers.add_metric(["disk"], snap.disk)
        tiers.add_metric(["refused"], snap.refused)
        yield tiers
        yield GaugeMetricFamily("dynamerge_host_adapter_bytes",
                                "Bytes of adapter tensors in host memory", value=snap.host_bytes)
        yield GaugeMetricFamily("dynamerge_merge_cache_entries",
                                "Virtual adapters (merges) in the cache", value=snap.merge_entries)
        yield GaugeMetricFamily("dynamerge_merge_cache_bytes",
                                "Bytes of the cached virtual adapters", value=snap.merge_bytes)
        # KV use for load balancing: `vllm:kv_cache_usage_perc` is vLLM v1's name (a fraction,
        # 0..1), `vllm:gpu_cache_usage_perc` the older one that gateways still read; both are
        # the share of the pool's slots reserved by requests (a full pool makes jobs wait).
        usage = snap.kv_slots_used / snap.kv_slots if snap.kv_slots else 0.0
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            yield GaugeMetricFamily(name, "KV-cache usage, 1 = full", value=usage)
        yield GaugeMetricFamily("dynamerge_kv_pool_slots", "Rows the KV pool holds",
                                value=snap.kv_slots)
        yield GaugeMetricFamily("dynamerge_kv_pool_tokens_used",
                                "Tokens with states in the KV pool", value=snap.kv_tokens_used)
        yield GaugeMetricFamily("dynamerge_kv_pool_bytes", "Bytes reserved by the KV pool",
                                value=snap.kv_bytes)
        yield GaugeMetricFamily("dynamerge_prefix_cache_bytes",
                                "Bytes of prompt states kept for reuse", value=snap.prefix_bytes)


ENGINE_STATE = EngineStateCollector()
REGISTRY.register(ENGINE_STATE)
