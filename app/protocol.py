"""Request and response shapes: the OpenAI ones, our extensions, and the REST ones.

Every bound the server enforces on a field is declared here (`Field(ge=..., le=...)`), so that
validation and the OpenAPI document are one thing. Bounds that come from the settings
(`max_tokens_limit`, `max_n`, `max_adapters`) are checked in app/api/deps.py and written into
the app's OpenAPI document by app/api/openapi.py; here are the static hard bounds.

Request models of the OpenAI endpoints accept extra fields, because clients send fields we
have no use for; the ones we cannot honour are refused by name (app/api/deps.py
`refuse_unsupported`). Our own extensions (`routing`, `merge`) are validated strictly so a
typo is a 422, not a silent default.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from adapters.registry import ADAPTER_ID_PATTERN

# The error type of values the validators below refuse: a 400 naming the field (app/api/errors).
INVALID_VALUE = "invalid_value"
MAX_STATIC_TOKENS = 1 << 20  # hard bound; the settings' max_tokens_limit is the real one
MAX_STATIC_N = 128  # hard bound; the settings' max_n is the real one
INT64 = 2**63 - 1
SEED_BOUND = 2**53  # exact in a JSON number (a double), as OpenAPI tools read bounds


def _whole(value: object) -> object:
    """JSON Schema's integers include 3.0: take it as 3 (strict mode would refuse it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Whole(**bounds: float) -> Any:
    """An integer with bounds, given as 3 or 3.0 (the bounds stay visible to the schema)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]

# Requests are validated strictly (no "5" for 5, no 0 for false): what the schema says is what
# is accepted. Unknown fields: allowed on OpenAI's shapes, forbidden on ours.
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# --- extensions (extra_body) --------------------------------------------------------------
class RoutingParams(_Strict):
    """Per-request overrides of the router's defaults (see router_index.router.RoutingOptions)."""

    top_k: Whole(ge=1, le=1024) | None = None  # and <= settings.max_adapters
    temperature: float | None = Field(default=None, ge=1e-6)  # the router's softmax needs 1/tau
    threshold: float | None = Field(default=None, ge=-1, le=1)
    scoring: Literal["centroid", "knn"] | None = None
    sharpening: Literal["two_stage", "single_stage"] | None = None
    renormalize: bool | None = None
    knn_m: Whole(ge=1, le=1024) | None = None
    adapters: list[str] | None = None
    explain: Whole(ge=0, le=100) | None = None


# One model per merge method of adapters.merge.MERGE_METHODS, with that method's parameters
# and their bounds (tests/test_api_fields.py checks they match the registry's). Unset
# parameters take the registry's defaults. `storage` and `rank` say how a non-linear merge is
# stored (truncated SVD at `rank`, or exactly); Twin's own `rank` parameter is not reachable.
_Sign = Literal["total", "frequency"]


class _MergeBase(_Strict):
    storage: Literal["svd", "exact"] | None = None
    rank: Whole(ge=1, le=4096) | None = None


class LinearMergeParams(_MergeBase):
    method: Literal["linear"] = "linear"


class TiesMergeParams(_MergeBase):
    method: Literal["ties"]
    density: float | None = Field(default=None, gt=0, le=1)
    majority_sign_method: _Sign | None = None


class DareLinearMergeParams(_MergeBase):
    method: Literal["dare_linear"]
    drop_rate: float | None = Field(default=None, ge=0, lt=1)
    seed: Whole(ge=0, le=SEED_BOUND) | None = None


class DareTiesMergeParams(DareLinearMergeParams):
    method: Literal["dare_ties"]  # type: ignore[assignment]
    majority_sign_method: _Sign | None = None


class NeuroMergeParams(_MergeBase):
    method: Literal["neuro"]
    mask_ratio: float | None = Field(default=None, gt=0, le=1)
    lambda_1: float | None = None
    lambda_2: float | None = None
    majority_sign_method: _Sign | None = None
    orthogonal_merge: Literal["svd", "coordinate"] | None = None


class TeMergeParams(_MergeBase):
    method: Literal["te"]
    keep_ratio: float | None = Field(default=None, gt=0, le=1)
    n_bins: Whole(ge=2, le=256) | None = None
    exclusive_full: bool | None = None


class TwinMergeParams(_MergeBase):
    method: Literal["twin"]
    shared_weight: float | None = None


MERGE_REQUEST_MODELS: dict[str, type[_MergeBase]] = {
    "linear": LinearMergeParams, "ties": TiesMergeParams, "dare_linear": DareLinearMergeParams,
    "dare_ties": DareTiesMergeParams, "neuro": NeuroMergeParams, "te": TeMergeParams,
    "twin": TwinMergeParams,
}


def _merge_tag(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("method", "linear")
    return getattr(value, "method", None)


MergeParams = Annotated[
    Annotated[LinearMergeParams, Tag("linear")] | Annotated[TiesMergeParams, Tag("ties")]
    | Annotated[DareLinearMergeParams, Tag("dare_linear")]
    | Annotated[DareTiesMergeParams, Tag("dare_ties")]
    | Annotated[NeuroMergeParams, Tag("neuro")] | Annotated[TeMergeParams, Tag("te")]
    | Annotated[TwinMergeParams, Tag("twin")],
    Discriminator(_merge_tag),
]


class _Extensions(_Lenient):
    routing: RoutingParams | None = None
    merge: MergeParams | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


ResponseFormat = Annotated[TextFormat | JsonObjectFormat, Field(discriminator="type")]
_TOKEN_ID = r"^(0|[1-9][0-9]{0,9})$"
TokenId = Annotated[str, StringConstraints(pattern=_TOKEN_ID)]
Bias = Annotated[float, Field(ge=-100, le=100)]
LogitBias = Annotated[dict[TokenId, Bias], WithJsonSchema({  # pydantic leaves out the last key
    "type": "object", "additionalProperties": False,
    "patternProperties": {_TOKEN_ID: {"type": "number", "minimum": -100, "maximum": 100}},
})]


class SamplingFields(_Extensions):
    """Sampling and extension fields shared by chat, completions and /v1/generate."""

    max_tokens: Whole(ge=1, le=MAX_STATIC_TOKENS) | None = None
    max_completion_tokens: Whole(ge=1, le=MAX_STATIC_TOKENS) | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: Whole(ge=-SEED_BOUND, le=SEED_BOUND) | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: LogitBias | None = Field(
        default=None, description="token id (a decimal string) -> bias added to its logit")
    ignore_eos: bool = Field(default=False, description="generate max_tokens whatever the "
                             "model says (benchmarks)")
    response_format: ResponseFormat | None = Field(
        default=None, description='{"type": "json_object"} constrains the output to one JSON '
        'object; "json_schema" is not supported (400)')

    @field_validator("response_format", mode="before")
    @classmethod
    def _no_json_schema(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("type") == "json_schema":
            raise PydanticCustomError(INVALID_VALUE, "response_format json_schema is not "
                                      "supported; use {\"type\": \"json_object\"}")
        return value

    def logprob_count(self) -> int | None:
        """Alternatives per token the engine reports (None: no log-probabilities)."""
        return None

    @property
    def json_object(self) -> bool:
        return isinstance(self.response_format, JsonObjectFormat)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _OpenAIGeneration(SamplingFields):
    model: str = Field(examples=["auto", "base"])
    n: Whole(ge=1, le=MAX_STATIC_N) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="an opaque end-user id, logged")


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The one error envelope (app/api/errors.py)."""

    error: ErrorDetail


# --- chat ---------------------------------------------------------------------------------
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    """`developer` is treated as `system`. Tool and function messages need tools: refused."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted; the chat template has no "
                             "place for it")
    tool_calls: None = Field(default=None, description="not supported (400)")
    function_call: None = Field(default=None, description="not supported (400)")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in content
        ):
            raise PydanticCustomError(INVALID_VALUE, "only text content parts are supported")
        return content

    @field_validator("tool_calls", "function_call", mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if value is not None:
            raise PydanticCustomError(INVALID_VALUE, "tool calls are not supported: the model "
                                      "cannot call tools")
        return value

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role: object) -> object:
        if role in ("tool", "function"):
            raise PydanticCustomError(INVALID_VALUE, f"role {role!r} needs tools, which are not "
                                      "supported")
        return role

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIGeneration):
    model_config = ConfigDict(json_schema_extra={  # top_logprobs only with logprobs: true
        "if": {"required": ["top_logprobs"],
               "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    })

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Whole(ge=0, le=20) | None = Field(default=None,
                                                    description="needs logprobs: true")

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(BaseModel):
    token: str
    logprob: float  # natural log, <= 0
    bytes: list[int] | None  # UTF-8 of `token`


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # best first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None = None


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
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    routing: RoutingInfo | None = None


# --- completions --------------------------------------------------------------------------
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class CompletionRequest(_OpenAIGeneration):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
    echo: bool = Field(default=False, description="echo is not supported",
                       json_schema_extra={"const": False})
    logprobs: Whole(ge=0, le=5) | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise PydanticCustomError(INVALID_VALUE, "echo is not supported")
        return echo

    def logprob_count(self) -> int | None:
        return self.logprobs


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # per token: up to `logprobs` alternatives
    text_offset: list[int]  # each token's offset in the completion's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None
    routing: RoutingInfo | None = None  # with several prompts: how this one was blended


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
    """Strings only: token arrays are not supported (the embedder has its own tokenizer)."""

    input: str | Annotated[list[str], Field(min_length=1)]
    model: str = "auto"  # any value is accepted: there is one embedder, the router's
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Whole(ge=1) | None = Field(default=None, description="only the embedder's own")


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
