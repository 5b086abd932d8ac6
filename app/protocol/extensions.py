"""Our extensions of the OpenAI shapes (`routing`, `merge`, sampling fields)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.protocol.base import (
    INVALID_VALUE,
    MAX_STATIC_N,
    MAX_STATIC_TOKENS,
    SEED_BOUND,
    Whole,
    _Lenient,
    _Strict,
)


# --- extensions (extra_body) --------------------------------------------------------------
class RoutingParams(_Strict):
    """Per-request overrides of the router's defaults (see router_index.router.RoutingOptions)."""

    top_k: Whole(ge=1, le=1024) | None = None  # and <= settings.max_adapters
    temperature: float | None = Field(default=None, ge=1e-6)  # the router's softmax needs 1/tau
    threshold: float | None = Field(default=None, ge=-1, le=1)
    scoring: Literal["centroid", "knn"] | None = None
    sharpening: Literal["two_stage", "single_stage"] | None = None
    renormalize: bool | None = None
    min_weight: float | None = Field(default=None, ge=0, lt=1)  # drop lighter runners-up
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

    def prompt_logprob_count(self) -> int | None:
        """Alternatives per prompt token the engine reports (None: the prompt is not echoed)."""
        return None

    @property
    def json_object(self) -> bool:
        return isinstance(self.response_format, JsonObjectFormat)


# Fields OpenAI marks nullable that have a non-null default here: null means the default (the
# schema says null is allowed; the value is never None once validated).
_NULL_MEANS_DEFAULT = frozenset({"n", "stream", "echo", "include_usage"})


def _drop_nulls(data: object) -> object:
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
    return data


class StreamOptions(_Lenient):
    include_usage: bool | None = False

    _nulls = model_validator(mode="before")(_drop_nulls)


class _OpenAIGeneration(SamplingFields):
    _nulls = model_validator(mode="before")(_drop_nulls)

    model: str = Field(examples=["auto", "base"])
    n: Whole(ge=1, le=MAX_STATIC_N) | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="an opaque end-user id, logged")


