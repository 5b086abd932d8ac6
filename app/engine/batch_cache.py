"""A KV cache shared by the running batch, whose rows join and leave between decode steps.

transformers' `DynamicCache` stores per layer `keys, values: [batch, heads, seq, head_dim]`.
Rows of different lengths are left-padded with zeros and masked out by `mask`, and each row
keeps its own position ids, so padding never changes a row's result.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import DynamicCache


class BatchCache:
    """The running batch's KV cache plus its attention mask `[batch, seq]` (1 = real token)."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def append(self, row_cache: DynamicCache, length: int) -> None:
        """Add one prefilled sequence (a batch-1 cache holding `length` tokens) as a new row."""
        mask = torch.ones(1, length, dtype=torch.long, device=_device(row_cache))
        if self.mask is None:
            self.cache, self.mask = row_cache, mask
            return
        have = self.mask.shape[1]
        if length > have:
            self._pad_left(self.cache, length - have)
            self.mask = F.pad(self.mask, (length - have, 0))
        elif length < have:
            self._pad_left(row_cache, have - length)
            mask = F.pad(mask, (have - length, 0))
        for ours, theirs in zip(self.cache.layers, row_cache.layers, strict=True):
            ours.keys = torch.cat([ours.keys, theirs.keys])
            ours.values = torch.cat([ours.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])

    def step_mask(self) -> torch.Tensor:
        """The mask for a decode step (every row attends to its new token too): [batch, seq+1]."""
        assert self.mask is not None
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop padding columns no row needs any more."""
        if not rows:
            self.cache, self.mask = DynamicCache(), None
            return
        assert self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        unused = int(self.mask.sum(dim=0).eq(0).long().cumprod(0).sum())  # all-pad left columns
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]

    @staticmethod
    def _pad_left(cache: DynamicCache, columns: int) -> None:
        for layer in cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
            layer.values = F.pad(layer.values, (0, 0, columns, 0))


def _device(cache: DynamicCache) -> torch.device:
    return cache.layers[0].keys.device
