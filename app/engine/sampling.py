"""Next-token choice per request, with transformers' own logits warpers."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from app.engine.types import SamplingParams


class Sampler:
    """Greedy or temperature / top-p sampling for one request, reproducible with a seed."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
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

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> int:
        """Pick the next token.

        Args:
            input_ids: [1, seq] the tokens so far (the warpers' interface).
            logits: [1, vocab] next-token logits.
        """
        if self.params.greedy:
            return int(logits.argmax(dim=-1))
        scores = self.warpers(input_ids, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
