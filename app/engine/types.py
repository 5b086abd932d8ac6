"""What goes into the engine and what comes out of it, and the errors it raises. No HTTP here.

Every error a request can meet is a typed `EngineError` (or a router / adapter error) that
names the request field at fault in `param`; the API maps types to statuses in one table and
never parses a message.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

from router_index.router import RouteDecision, RoutingOptions

FinishReason = Literal["stop", "length", "cancelled", "error"]
GREEDY_BELOW = 1e-5  # sampling temperatures under this are greedy decoding
_ids = itertools.count(1)


# --- errors ---------------------------------------------------------------------------------
class EngineError(Exception):
    """Base class of the problems the engine reports for a request."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, dotted ("routing.top_k"), if any


class InvalidRequestError(EngineError):
    """A field is well-formed but its value cannot be served (400)."""


class ContextLengthExceededError(EngineError):
    """Prompt plus max_tokens does not fit the model's context (400)."""


class EngineOverloadedError(EngineError):
    """Too many requests in flight (429); retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReadyError(EngineError):
    """Not loaded yet, or draining (503)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The engine's worker failed beyond recovery; nothing more will be served (503)."""


class AdapterPlacementError(EngineError):
    """The request's adapters could not be made resident within the placement timeout (503)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationError(EngineError):
    """Generating this request failed (a forward pass, its sampling, its text) (500)."""


class RequestCancelledError(EngineError):
    """The engine stopped the request before it finished (shutdown) (503)."""


# --- requests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and k alternatives
    json_object: bool = False  # constrain the output to one JSON object
    # The prompt's own tokens' logprobs (echo): None: none; k >= 0: with k alternatives each.
    # The prompt then skips the prefix cache (every position's logits are needed).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise InvalidRequestError("max_tokens must be >= 1 (0 only with the prompt's "
                                      "logprobs: echo)", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be in [0, 2]", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2]", param=name)
        for token, bias in self.logit_bias:
            if token < 0 or not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise InvalidRequestError(
                    "logit_bias maps token ids (>= 0) to biases in [-100, 100]",
                    param="logit_bias",
                )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", param="top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError("logprobs must be in [0, 20]", param="logprobs")

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows: it is greedy anyway.
        return self.temperature < GREEDY_BELOW


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
    route_text: str  # what the router embeds (for chat: the last user message); "": the prompt
    model: str = "auto"  # "auto" routes, "base" blends nothing, else one adapter id
    routing: RoutingOptions | None = None  # None: the server's defaults
    merge: MergeSpec = field(default_factory=MergeSpec)
    # Explicit (adapter id, weight) pairs instead of routing (static merges, exports); only
    # with model "auto".
    mix: tuple[tuple[str, float], ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # The prompt as the base model's token ids (OpenAI's token-id prompts); then `prompt` is
    # ignored and the router embeds their decoded text when `route_text` is empty.
    prompt_ids: tuple[int, ...] | None = None


# --- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, with its best alternatives."""

    token_id: int
    logprob: float  # natural log, from the model's raw logits (before sampling warpers)
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) best first


@dataclass(frozen=True)
class TokenEvent:
    """Text produced since the previous event, or the final event (finish_reason set)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `token_ids`, when asked for
    error: EngineError | None = None  # why, when finish_reason is "error" or "cancelled"
    cached_tokens: int = 0  # prompt tokens whose states came from the prefix cache
    # Once, before the first token, when the request asked for the prompt's logprobs: the
    # prompt's ids and text, and one entry per prompt token after the first (the first has
    # no context to be predicted from).
    prompt_ids: tuple[int, ...] = ()
    prompt_text: str = ""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Admission:
    """What the engine decided for a request before generating: the route and the prompt size."""

    request_id: str
    decision: RouteDecision | None  # None when the model was forced (base or an adapter id)
    blend: tuple[tuple[str, float], ...]  # (adapter id, weight) selected for the request
    prompt_tokens: int
    method: str = "linear"  # merge method that combined them
    cache_hit: bool | None = None  # virtual adapter reused from the cache (non-linear methods)
