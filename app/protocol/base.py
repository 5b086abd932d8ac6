"""Shared pieces: strictness, bounded integers, the error envelope, usage and routing info."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


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


