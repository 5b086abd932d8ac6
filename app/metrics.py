"""Every Prometheus metric of the server, defined once. Names carry the `dynamerge_` prefix."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
QUEUE_DEPTH = Gauge("dynamerge_queue_depth", "Requests admitted and waiting for the engine")
RUNNING_REQUESTS = Gauge("dynamerge_running_requests", "Requests being generated")
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
