"""What goes into the engine and what comes out of it. No HTTP here."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from router_index.router import RouteDecision, RoutingOptions

FinishReason = Literal["stop", "length", "cancelled", "error"]
_ids = itertools.count(1)


class EngineError(Exception):
    """Base class of request problems the engine detects (mapped to 4xx by the API)."""


class ContextLengthExceededError(EngineError):
    """Prompt plus max_tokens does not fit the model's context."""


class EngineOverloadedError(EngineError):
    """The queue is full."""


class EngineNotReadyError(EngineError):
    """Not loaded yet, or draining."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class MergeSpec:
    """How the selected adapters are combined: a method of `adapters.merge.MERGE_METHODS`."""

    method: str = "linear"
    params: tuple[tuple[str, object], ...] = ()  # method parameters, e.g. (("density", 0.3),)
    storage: str | None = None  # "svd" or "exact" for non-linear results; None: server default
    rank: int | None = None  # truncated-SVD rank of a virtual adapter; None: server default

    @property
    def is_linear(self) -> bool:
        return self.method == "linear"


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # fully rendered prompt text (chat template already applied)
    route_text: str  # what the router embeds (for chat: the last user message)
    model: str = "auto"  # "auto" routes, "base" blends nothing, else one adapter id
    routing: RoutingOptions | None = None  # None: the server's defaults
    merge: MergeSpec = field(default_factory=MergeSpec)
    # Explicit (adapter id, weight) pairs instead of routing (static merges, exports); only
    # with model "auto".
    mix: tuple[tuple[str, float], ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass(frozen=True)
class TokenEvent:
    """Text produced since the previous event, or the final event (finish_reason set)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Admission:
    """What the engine decided for a request before generating: the route and the prompt size."""

    request_id: str
    decision: RouteDecision | None  # None when the model was forced (base or an adapter id)
    blend: tuple[tuple[str, float], ...]  # (adapter id, weight) selected for the request
    prompt_tokens: int
    method: str = "linear"  # merge method that combined them
    cache_hit: bool | None = None  # virtual adapter reused from the cache (non-linear methods)
