"""Next-token choice per request: logit processors, warpers, constraints and log-probabilities.

Order, as in the OpenAI API and vLLM: logit_bias and the presence / frequency penalties change
the logits; temperature and top_p warp them; a constraint (JSON mode) then vetoes tokens that
would make the output invalid. Log-probabilities are those of the model's raw logits.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from app.engine.types import SamplingParams, TokenLogprob

_SAMPLE_TRIES = 16  # rejection-sampling draws against a constraint before scanning in order


class TokenConstraint(Protocol):
    """Which tokens may come next, for one sequence (JSON mode implements it)."""

    def allows(self, token_id: int) -> bool:
        """Whether appending `token_id` keeps the output a valid prefix."""

    def advance(self, token_id: int) -> None:
        """Record the token that was chosen."""

    @property
    def complete(self) -> bool:
        """The output is complete: only end-of-sequence may follow."""


class OpenAIPenalties:
    """presence_penalty and frequency_penalty as the OpenAI API defines them, over the tokens
    generated so far: `logit[j] -= presence * (count[j] > 0) + frequency * count[j]`.

    (transformers' RepetitionPenaltyLogitsProcessor is multiplicative and counts the prompt,
    which is a different knob.)
    """

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self.counts: dict[int, int] = {}

    def observe(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.counts:
            return logits
        ids = torch.tensor(list(self.counts), device=logits.device)
        counts = torch.tensor(list(self.counts.values()), device=logits.device,
                              dtype=logits.dtype)
        penalty = self.presence + self.frequency * counts
        return logits.index_add(-1, ids, -penalty.expand(logits.shape[0], -1))


class Sampler:
    """Greedy or temperature / top-p sampling for one request, reproducible with a seed.

    Args:
        params: the request's sampling parameters (validated).
        device: where the logits live.
        eos_id: what a complete constrained output must end with.
        constraint: vetoes tokens (JSON mode); None: every token is allowed.
    """

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device,
        eos_id: int | None = None,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.params = params
        self.eos_id = eos_id
        self.constraint = constraint
        self.processors = LogitsProcessorList()
        if params.logit_bias:
            self.processors.append(SequenceBiasLogitsProcessor(
                sequence_bias=[[[t], b] for t, b in params.logit_bias]))
        self.penalties = (
            OpenAIPenalties(params.presence_penalty, params.frequency_penalty)
            if params.presence_penalty or params.frequency_penalty else None
        )
        self.warpers = LogitsProcessorList()
        if not params.greedy:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        # A generator of its own per request: other requests never shift its random stream.
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits is the whole decision (the batch can take it at once)."""
        return (self.params.greedy and not self.processors and self.penalties is None
                and self.constraint is None and self.params.logprobs is None)

    def __call__(
        self, token_ids: list[int], logits: torch.Tensor
    ) -> tuple[int, TokenLogprob | None]:
        """Pick the next token.

        Args:
            token_ids: the sequence so far, prompt included (what processors look at).
            logits: [1, vocab] next-token logits.

        Returns:
            The token and, when asked for, its log-probability with the top alternatives.
        """
        raw = logits.float()
        scores = raw
        if self.processors:
            history = torch.tensor([token_ids], device=logits.device)
            scores = self.processors(history, scores)
        if self.penalties is not None:
            scores = self.penalties(scores)
        if self.constraint is not None and self.constraint.complete and self.eos_id is not None:
            token = self.eos_id
        elif self.params.greedy:
            token = self._greedy(scores[0])
        else:
            history = torch.tensor([token_ids], device=logits.device)
            token = self._sample(torch.softmax(self.warpers(history, scores), dim=-1)[0])
        if self.penalties is not None:
            self.penalties.observe(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        return token, self._logprob(raw[0], token)

    def _greedy(self, scores: torch.Tensor) -> int:
        best = int(scores.argmax())
        if self.constraint is None or self.constraint.allows(best):
            return best
        return self._first_allowed(torch.argsort(scores, descending=True))

    def _sample(self, probs: torch.Tensor) -> int:
        for _ in range(_SAMPLE_TRIES if self.constraint is not None else 1):
            token = int(torch.multinomial(probs, 1, generator=self.generator))
            if self.constraint is None or self.constraint.allows(token):
                return token
            probs = probs.clone()
            probs[token] = 0.0
            if float(probs.sum()) <= 0.0:
                break
        return self._first_allowed(torch.argsort(probs, descending=True))

    def _first_allowed(self, order: torch.Tensor) -> int:
        assert self.constraint is not None
        for token in order.tolist():
            if self.constraint.allows(token):
                return int(token)
        if self.eos_id is not None:
            return self.eos_id
        raise RuntimeError("the output constraint allows no token")

    def _logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob | None:
        k = self.params.logprobs
        if k is None:
            return None
        logprobs = torch.log_softmax(raw, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            values, ids = logprobs.topk(k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token, float(logprobs[token]), top)
