"""KV caches of prompts being prefilled (the running rows' states live in `kv_pool`).

transformers' cache layers store `keys, values: [batch, heads, seq, head_dim]`. Rows of a batch
differ in length, so every row carries a mask over the columns (1 = a real token). Padding
columns hold zeros or the states of padding inputs, are masked out for every query, and each
row keeps its own position ids, so padding never changes a row's result.

- `RowCache`: one sequence's KV and mask (a prompt being prefilled in chunks lives in one).
- `stack_rows` / `split_rows`: rows to one batched cache for a prefill forward, and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache


@dataclass
class RowCache:
    """One sequence's cached states: per layer `(keys, values)` `[1, heads, cols, dim]`."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor  # [cols] long, 1 = real token

    @property
    def width(self) -> int:
        return int(self.mask.shape[0])


def stack_rows(rows: list[RowCache | None], device: torch.device) -> tuple[Cache, torch.Tensor]:
    """Rows (None: nothing cached yet) as one left-padded `DynamicCache` and its mask [B, W]."""
    width = max((r.width for r in rows if r is not None), default=0)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        if row is not None:
            mask[b, width - row.width:] = row.mask
    if width == 0:
        return DynamicCache(), mask
    like = next(r for r in rows if r is not None)
    data = []
    for layer, (k0, v0) in enumerate(like.layers):
        keys = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(rows), v0.shape[1], width, v0.shape[3])
        for b, row in enumerate(rows):
            if row is not None:
                k, v = row.layers[layer]
                keys[b, :, width - row.width:] = k[0]
                values[b, :, width - row.width:] = v[0]
        data.append((keys, values))
    return DynamicCache(ddp_cache_data=data), mask


def split_rows(cache: Cache, mask: torch.Tensor) -> list[RowCache]:
    """The rows of a batched cache, each without the padding columns no row of it needs."""
    rows = []
    for b in range(mask.shape[0]):
        start = _leading_pad(mask[b : b + 1])
        rows.append(RowCache(
            layers=[(layer.keys[b : b + 1, :, start:].clone(),
                     layer.values[b : b + 1, :, start:].clone()) for layer in cache.layers],
            mask=mask[b, start:].clone(),
        ))
    return rows


def _leading_pad(mask: torch.Tensor) -> int:
    """Columns at the left that are padding in every row of `mask` [rows, cols]."""
    return int(mask.sum(dim=0).eq(0).long().cumprod(0).sum())
