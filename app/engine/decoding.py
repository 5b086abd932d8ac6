"""One sequence's decoding state: its tokens, its sampler, its text, its stop conditions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from app.engine.detokenize import IncrementalText
from app.engine.sampling import Sampler, TokenConstraint
from app.engine.types import FinishReason, GenerationRequest, TokenLogprob

ConstraintFactory = Callable[[GenerationRequest], TokenConstraint | None]


class Sequence:
    """The state of one request being generated.

    `prefilled` counts the prompt tokens already in the KV cache: a long prompt is prefilled in
    chunks over several steps, and the sequence samples its first token once it reaches
    `len(prompt_ids)`.
    """

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        device: torch.device,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.eos_ids = eos_ids
        self.ignore_eos = request.sampling.ignore_eos
        eos_id = min(eos_ids) if eos_ids else None
        self.sampler = Sampler(request.sampling, device, eos_id, constraint)
        self.text = IncrementalText(tokenizer, request.sampling.stop)
        self.token_ids = list(prompt_ids)  # prompt, then every generated token
        self.prefilled = 0

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Sample the next token from `logits` [1, vocab]."""
        return self.sampler(self.token_ids, logits)

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Record a sampled token. Returns the text it releases and why we stop, if we do."""
        self.token_ids.append(token)
        if token in self.eos_ids and not self.ignore_eos:
            return self.text.flush(), "stop"
        delta = self.text.add(token)
        if self.text.stopped:
            return delta, "stop"
        if len(self.text.token_ids) >= self.request.sampling.max_tokens:
            return delta + self.text.flush(), "length"
        return delta, None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the KV cache."""
        return len(self.prompt_ids) - self.prefilled

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)
