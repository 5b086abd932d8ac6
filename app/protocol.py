"""Request and response shapes: the OpenAI ones, our extensions, and the REST ones.

Request models of the OpenAI endpoints accept extra fields, because the official client and
other tools send fields we have no use for (`user`, `metadata`, ...); our own extensions
(`routing`, `merge`) are validated strictly so a typo is a 422, not a silent default.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- extensions (extra_body) --------------------------------------------------------------
class RoutingParams(_Strict):
    """Per-request overrides of the router's defaults (see router_index.router.RoutingOptions)."""

    top_k: int | None = None
    temperature: float | None = None
    threshold: float | None = None
    scoring: Literal["centroid", "knn"] | None = None
    sharpening: Literal["two_stage", "single_stage"] | None = None
    renormalize: bool | None = None
    knn_m: int | None = None
    adapters: list[str] | None = None
    explain: int | None = Field(default=None, ge=0, le=100)


class MergeParams(_Lenient):
    """`method` plus that method's own parameters (extra fields, checked per method)."""

    method: str = "linear"


class _Extensions(_Lenient):
    routing: RoutingParams | None = None
    merge: MergeParams | None = None


class SamplingFields(_Extensions):
    """Sampling and extension fields shared by chat, completions and /v1/generate."""

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _OpenAIGeneration(SamplingFields):
    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None


# --- responses shared by both endpoints ---------------------------------------------------
class AdapterWeight(BaseModel):
    id: str
    score: float | None  # Eq. 5 mean cosine; None when the adapter was forced by `model`
    weight: float


class RoutingInfo(BaseModel):
    adapters: list[AdapterWeight]
    method: str
    fallback: bool
    cache_hit: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


# --- chat ---------------------------------------------------------------------------------
class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        if isinstance(content, list) and any(p.get("type") != "text" for p in content):
            raise ValueError("only text content parts are supported")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIGeneration):
    messages: list[ChatMessage]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    routing: RoutingInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    routing: RoutingInfo | None = None


# --- completions --------------------------------------------------------------------------
class CompletionRequest(_OpenAIGeneration):
    prompt: str | list[str]
    echo: bool = False


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    routing: RoutingInfo | None = None


# --- models -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dynamerge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- embeddings ---------------------------------------------------------------------------
class EmbeddingRequest(_Lenient):
    input: str | list[str] | list[int] | list[list[int]]
    model: str = "auto"  # any value is accepted: there is one embedder, the router's
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# --- REST ---------------------------------------------------------------------------------
class RouteRequest(_Strict):
    text: str | None = None
    messages: list[ChatMessage] | None = None  # routed on the last user message, as chat is
    routing: RoutingParams | None = None


class NearestExemplar(BaseModel):
    adapter: str
    text: str
    score: float  # cosine to the query


class RouteResponse(BaseModel):
    adapters: list[AdapterWeight]  # blended, best first; empty on fallback
    scores: dict[str, float]  # every candidate task
    fallback: bool
    nearest: list[NearestExemplar]
    latency_ms: float


class GenerateRequest(SamplingFields):
    prompt: str
    model: str = "auto"
    chat: bool = True  # wrap the prompt as one user message in the chat template


class GenerateResponse(_Response):
    object: Literal["generation"] = "generation"
    text: str
    finish_reason: str
    usage: Usage
    routing: RoutingInfo


class AdapterRequest(_Strict):
    id: str


class AdapterResponse(BaseModel):
    id: str
    object: Literal["model"] = "model"
    status: Literal["registered", "deleted"]
    adapters: list[str]  # every adapter loaded after the change


class AdapterTier(BaseModel):
    id: str
    tier: Literal["device", "host", "disk"]  # the fastest tier holding the adapter now
    rank: int
    modules: int  # LoRA-targeted layers
    bytes: int  # its tensors once loaded
    exemplars: int
    requests: int  # requests using its device slot now
    pinned: bool  # kept on the device by DYNAMERGE_PINNED_ADAPTERS


class RefusedAdapterInfo(BaseModel):
    id: str
    reason: str  # the validation error, naming the culprit


class AdapterTierList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterTier]
    refused: list[RefusedAdapterInfo]


class MergePreviewRequest(_Strict):
    """Either the adapters to merge, or a prompt that is routed first (its top-K)."""

    adapters: list[str] | None = None
    prompt: str | None = None
    routing: RoutingParams | None = None
    max_modules: int = Field(default=24, ge=1, le=100_000)  # evenly spaced modules inspected


class MergePreviewResponse(BaseModel):
    adapters: list[str]
    modules: int  # modules inspected
    cosine: list[list[float]]  # [K][K] cosine similarity of the task vectors
    sign_conflict_total: float  # entries where nonzero task-vector entries disagree in sign
    sign_conflict: dict[str, float]  # per module
    removed_mass: dict[str, dict[str, float]]  # method -> adapter -> share of L1 mass pruned
    parallel_fraction: dict[str, float] | None  # adapter -> energy along the pre-trained rows
