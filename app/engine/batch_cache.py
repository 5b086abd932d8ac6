"""KV caches for iteration-level batching: rows join, grow and leave between steps.

transformers' cache layers store `keys, values: [batch, heads, seq, head_dim]`. Rows of a batch
differ in length, so every row carries a mask over the columns (1 = a real token). Padding
columns hold zeros or the states of padding inputs, are masked out for every query, and each
row keeps its own position ids, so padding never changes a row's result.

- `RowCache`: one sequence's KV and mask (a prompt being prefilled in chunks lives in one).
- `stack_rows` / `split_rows`: rows to one batched cache for a prefill forward, and back.
- `BatchCache`: the running batch. Its layers write each decode step's column in place into
  preallocated buffers, so a step costs no copy of the whole cache (a `DynamicCache` concatenates
  every layer's keys and values on every step: O(sequence) per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_GROWTH = 64  # columns added past what is needed, when a buffer must grow


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


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views of buffers with spare columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take `keys`, `values` [batch, heads, cols, dim] (copied into buffers with room)."""
        super().__init__()
        self.lazy_initialization(keys, values)
        self._k, self._v = _with_room(keys), _with_room(values)
        self._len = keys.shape[2]
        self._view()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._len + key_states.shape[2]
        if end > self._k.shape[2]:
            self._k = _grown(self._k, self._len, end + _GROWTH)
            self._v = _grown(self._v, self._len, end + _GROWTH)
        self._k[:, :, self._len:end] = key_states
        self._v[:, :, self._len:end] = value_states
        self._len = end
        self._view()
        return self.keys, self.values

    def _view(self) -> None:
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]


def _grown(buffer: torch.Tensor, used: int, columns: int) -> torch.Tensor:
    out = buffer.new_zeros(buffer.shape[0], buffer.shape[1], columns, buffer.shape[3])
    out[:, :, :used] = buffer[:, :, :used]
    return out


class BatchCache:
    """The running batch's KV cache plus its attention mask `[batch, cols]` (1 = real token)."""

    def __init__(self) -> None:
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, rows: list[RowCache]) -> None:
        """Append prefilled rows at the end of the batch (left-padding everyone to one width)."""
        if not rows:
            return
        current = [] if self.cache is None else [self._row(b) for b in range(self.size)]
        merged = current + rows
        device = rows[0].mask.device
        stacked, mask = stack_rows(merged, device)  # type: ignore[arg-type]
        self.cache = Cache(layers=[GrowingLayer(layer.keys, layer.values)
                                   for layer in stacked.layers])
        self.mask = mask

    def step_mask(self) -> torch.Tensor:
        """The mask for a decode step (every row attends to its new token too): [batch, cols+1]."""
        assert self.mask is not None
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop padding columns no row needs any more."""
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None and self.cache is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = _leading_pad(mask)
        self.mask = mask[:, start:]
        self.cache = Cache(layers=[
            GrowingLayer(layer.keys.index_select(0, index)[:, :, start:],
                         layer.values.index_select(0, index)[:, :, start:])
            for layer in self.cache.layers
        ])

    def _row(self, b: int) -> RowCache:
        assert self.mask is not None and self.cache is not None
        start = _leading_pad(self.mask[b : b + 1])
        return RowCache(
            layers=[(layer.keys[b : b + 1, :, start:], layer.values[b : b + 1, :, start:])
                    for layer in self.cache.layers],
            mask=self.mask[b, start:],
        )


def _with_room(states: torch.Tensor) -> torch.Tensor:
    """A buffer holding `states` with `_GROWTH` spare columns."""
    out = states.new_zeros(states.shape[0], states.shape[1], states.shape[2] + _GROWTH,
                           states.shape[3])
    out[:, :, : states.shape[2]] = states
    return out


def _leading_pad(mask: torch.Tensor) -> int:
    """Columns at the left that are padding in every row of `mask` [rows, cols]."""
    return int(mask.sum(dim=0).eq(0).long().cumprod(0).sum())
