"""The REST, admin and health shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
)

from adapters.registry import ADAPTER_ID_PATTERN
from app.protocol.base import (
    AdapterWeight,
    RoutingInfo,
    Usage,
    Whole,
    _Response,
    _Strict,
)
from app.protocol.extensions import (
    RoutingParams,
    SamplingFields,
)
from app.protocol.openai_shapes import (
    ChatMessage,
    NonEmpty,
)


# --- REST ---------------------------------------------------------------------------------
def _exactly_one(a: str, b: str) -> dict[str, Any]:
    return {"oneOf": [{"required": [a], "not": {"required": [b]}},
                      {"required": [b], "not": {"required": [a]}}]}


class RouteRequest(_Strict):
    """Exactly one of `text` and `messages` (routed on the last user message, as chat is)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("text", "messages"))

    text: str = None  # type: ignore[assignment]  # optional, never null
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = None  # type: ignore[assignment]
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
    model_config = ConfigDict(extra="forbid")

    prompt: NonEmpty
    model: str = Field(default="auto", examples=["auto", "base"])
    chat: bool = True  # wrap the prompt as one user message in the chat template


class GenerateResponse(_Response):
    object: Literal["generation"] = "generation"
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    routing: RoutingInfo


AdapterId = Annotated[str, StringConstraints(pattern=ADAPTER_ID_PATTERN.pattern)]


class AdapterRequest(_Strict):
    id: AdapterId = Field(description="a directory of the adapter store; not auto or base",
                          json_schema_extra={"not": {"enum": ["auto", "base"]}})


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

    model_config = ConfigDict(json_schema_extra=_exactly_one("adapters", "prompt"))

    adapters: Annotated[list[str], Field(min_length=1)] = None  # type: ignore[assignment]
    prompt: NonEmpty = None  # type: ignore[assignment]
    routing: RoutingParams | None = None
    max_modules: Whole(ge=1, le=100_000) = 24  # evenly spaced modules inspected


class MergePreviewResponse(BaseModel):
    adapters: list[str]  # empty when the prompt falls back (nothing to merge)
    modules: int  # modules inspected
    cosine: list[list[float]]  # [K][K] cosine similarity of the task vectors
    sign_conflict_total: float  # entries where nonzero task-vector entries disagree in sign
    sign_conflict: dict[str, float]  # per module
    removed_mass: dict[str, dict[str, float]]  # method -> adapter -> share of L1 mass pruned
    parallel_fraction: dict[str, float] | None  # adapter -> energy along the pre-trained rows
    fallback: bool = False  # the prompt fell back to the base model


# --- health -------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "draining"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    adapters: int  # servable adapters of the store (a count: a store may hold thousands)
    device: str
    dtype: str
    queued: int
    running: int
