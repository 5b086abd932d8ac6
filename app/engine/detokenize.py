"""Incremental detokenization with stop strings: emit text only once it can no longer change."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalText:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that could still become a stop string, or ends in an incomplete UTF-8 character, is
    held back until the next token decides it; a stop string itself is never emitted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly safe text (possibly empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text, max(cut, self.emitted))
        safe = len(text) - self._held_back(text)
        return self._emit(text, max(safe, self.emitted))

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._emit(text, len(text))

    def _emit(self, text: str, end: int) -> str:
        delta = text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return len(text) - self.emitted
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
