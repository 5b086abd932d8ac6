"""One sequence's decode loop: prefill, then a token per step until a stop condition."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from app import metrics
from app.engine.detokenize import IncrementalText
from app.engine.sampling import Sampler
from app.engine.stream import GenerationStream
from app.engine.types import FinishReason, GenerationRequest, TokenEvent

Forward = Callable[[torch.Tensor, DynamicCache], torch.Tensor]  # ids [1, t] -> logits [1, V]


class Sequence:
    """The state of one request being generated."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        device: torch.device,
    ) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.eos_ids = eos_ids
        self.device = device
        self.sampler = Sampler(request.sampling, device)
        self.text = IncrementalText(tokenizer, request.sampling.stop)
        self.all_ids = torch.tensor([prompt_ids], device=device)

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Record a sampled token. Returns the text it releases and why we stop, if we do."""
        self.all_ids = torch.cat([self.all_ids, self.all_ids.new_tensor([[token]])], dim=1)
        if token in self.eos_ids:
            return self.text.flush(), "stop"
        delta = self.text.add(token)
        if self.text.stopped:
            return delta, "stop"
        if len(self.text.token_ids) >= self.request.sampling.max_tokens:
            return delta + self.text.flush(), "length"
        return delta, None

    @property
    def completion_tokens(self) -> int:
        return self.all_ids.shape[1] - len(self.prompt_ids)


@torch.inference_mode()
def run_sequence(
    sequence: Sequence, forward: Forward, stream: GenerationStream, admitted_at: float
) -> None:
    """Generate `sequence` to the end, streaming its text; stops early if the stream is cancelled.

    Prompt and completion counts and latencies go to the metrics as the request finishes.
    """
    cache = DynamicCache()
    logits = forward(sequence.all_ids, cache)
    first_token_at = None
    while True:
        if stream.cancelled:
            reason: FinishReason = "cancelled"
            stream.put(_final(sequence, "", (), reason))
            break
        token = sequence.sampler(sequence.all_ids, logits)
        delta, finish = sequence.accept(token)
        if first_token_at is None:
            first_token_at = time.perf_counter()
            metrics.TIME_TO_FIRST_TOKEN.observe(first_token_at - admitted_at)
        if finish is not None:
            reason = finish
            stream.put(_final(sequence, delta, (token,), reason))
            break
        if delta:
            stream.put(TokenEvent(delta, (token,)))
        logits = forward(sequence.all_ids[:, -1:], cache)
    done = time.perf_counter()
    completion = sequence.completion_tokens
    metrics.PROMPT_TOKENS.inc(len(sequence.prompt_ids))
    metrics.GENERATION_TOKENS.inc(completion)
    metrics.E2E_LATENCY.observe(done - admitted_at)
    if first_token_at is not None and completion > 1:
        metrics.TIME_PER_OUTPUT_TOKEN.observe((done - first_token_at) / (completion - 1))
    metrics.FINISHED.labels(reason=reason).inc()


def _final(
    sequence: Sequence, text: str, token_ids: tuple[int, ...], reason: FinishReason
) -> TokenEvent:
    return TokenEvent(
        text, token_ids, finish_reason=reason,
        prompt_tokens=len(sequence.prompt_ids), completion_tokens=sequence.completion_tokens,
    )
