"""One sequence's decoding state: its tokens, its sampler, its text, its stop conditions."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from app.engine.detokenize import IncrementalText
from app.engine.sampling import Sampler
from app.engine.types import FinishReason, GenerationRequest


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
    def length(self) -> int:
        return self.all_ids.shape[1]

    @property
    def last_token(self) -> int:
        return int(self.all_ids[0, -1])

    @property
    def completion_tokens(self) -> int:
        return self.all_ids.shape[1] - len(self.prompt_ids)
