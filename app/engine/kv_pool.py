"""The running batch's KV storage: one preallocated slot per running row.

Every layer owns two buffers `[slots, kv_heads, slot_tokens, head_dim]`, allocated once. A row
that starts decoding gets a free slot and its prompt's states are copied into it (its own KV,
nobody else's); a row that leaves gives its slot back and nothing is copied. A decode step
runs over slots `0 .. hi` (the highest slot in use): each row's states are left-aligned in its
slot, the new token's keys and values are written in place at the row's own column, and the
attention mask hides each row's unused columns (and the free slots' stale contents).

Why slots rather than transformers' `PagedAttentionCache`: on CPU its eager/SDPA paths gather
every row's blocks into a contiguous tensor on every forward (a copy of the batch's whole KV
per layer per step), and its scheduler, model runner and prefix hash (tokens only) replace
ours; a slot is a view, so a step copies nothing but the new column. The slot's buffer is
allocated with `torch.empty`: the operating system maps pages only when they are first
written, so a slot reserved for the model's whole context costs resident memory only for the
tokens it really held.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's slot buffers; `keys`/`values` are views of the slots of the current step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.is_initialized = True
        self.dtype, self.device = k.dtype, k.device
        self.pool_k, self.pool_v = k, v
        self._rows: torch.Tensor | None = None  # slots of this step
        self._cols: torch.Tensor | None = None  # each row's column for the new token
        self._width = 0

    def begin(self, hi: int, width: int, cols: torch.Tensor) -> None:
        """Slots `0..hi-1` decode one token each; `width` columns are visible before it."""
        self._rows = torch.arange(hi, device=cols.device)
        self._cols = cols
        self._width = width
        self.keys = self.pool_k[:hi, :, :width]
        self.values = self.pool_v[:hi, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._rows is not None and key_states.shape[2] == 1
        hi = self._rows.shape[0]
        self.pool_k[self._rows, :, self._cols] = key_states[:, :, 0]
        self.pool_v[self._rows, :, self._cols] = value_states[:, :, 0]
        self.keys = self.pool_k[:hi, :, : self._width + 1]
        self.values = self.pool_v[:hi, :, : self._width + 1]
        return self.keys, self.values


class SlotPool:
    """`slots` rows of `slot_tokens` tokens each, for every layer of the model.

    Args:
        layers: number of decoder layers.
        kv_heads, head_dim: the shape of one token's keys (and values) in one layer.
        slots: rows that can decode at once.
        slot_tokens: the most tokens (prompt and generated) one row may hold.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int,
                 slot_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, slot_tokens, head_dim)
        self.layers = [SlotLayer(torch.empty(shape, dtype=dtype, device=device),
                                 torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(layers)]
        self.cache = Cache(layers=self.layers)
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.lens = [0] * slots  # tokens with states in each slot
        # Columns of each slot ever written or zeroed: `torch.empty` may hold NaN, and a
        # masked column still meets the attention weights (0 * NaN = NaN), so a decode step
        # zeroes the columns it reads for the first time (once per column: cheap).
        self._clean = [0] * slots
        self.used = [False] * slots
        self.device = device
        self.copied_tokens = 0  # tokens copied into slots (joins), for tests and metrics

    @property
    def token_bytes(self) -> int:
        """Bytes one token's states take in all layers."""
        k = self.layers[0].pool_k
        return 2 * len(self.layers) * k.shape[1] * k.shape[3] * k.element_size()

    @property
    def capacity_bytes(self) -> int:
        return self.slots * self.slot_tokens * self.token_bytes

    @property
    def free(self) -> int:
        return self.used.count(False)

    @property
    def in_use(self) -> int:
        return self.slots - self.free

    @property
    def used_tokens(self) -> int:
        return sum(n for n, u in zip(self.lens, self.used, strict=True) if u)

    def allocate(self) -> int:
        """The lowest free slot (so decode steps stay short); the caller checked `free`."""
        slot = self.used.index(False)
        self.used[slot] = True
        self.lens[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.used[slot] = False
        self.lens[slot] = 0

    def write(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one row's states (per layer `[heads, tokens, dim]`) into its slot."""
        n = layers[0][0].shape[1]
        for layer, (k, v) in zip(self.layers, layers, strict=True):
            layer.pool_k[slot, :, :n] = k
            layer.pool_v[slot, :, :n] = v
        self.lens[slot] = n
        self._clean[slot] = max(self._clean[slot], n)
        self.copied_tokens += n

    def read(self, slot: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of a slot's first `tokens` states, per layer `[heads, tokens, dim]`."""
        return [(layer.pool_k[slot, :, :tokens], layer.pool_v[slot, :, :tokens])
                for layer in self.layers]

    def begin_decode(self, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a decode step over slots `0..hi-1`; returns its attention mask
        `[hi, width+1]` and the column each row's new token goes to. Free slots attend to
        one stale column so that no row is fully masked; their outputs are ignored."""
        lens = torch.tensor(self.lens[:hi], device=self.device)
        width = int(lens.max())
        for slot in range(hi):
            if self._clean[slot] < width + 1:
                for layer in self.layers:
                    layer.pool_k[slot, :, self._clean[slot]: width + 1] = 0
                    layer.pool_v[slot, :, self._clean[slot]: width + 1] = 0
                self._clean[slot] = width + 1
        cols = torch.arange(width + 1, device=self.device)
        mask = (cols[None, :] <= lens[:, None]).long()
        for layer in self.layers:
            layer.begin(hi, width, lens)
        return mask, lens

    def end_decode(self, hi: int) -> None:
        for slot in range(hi):
            if self.used[slot]:
                self.lens[slot] += 1


def pool_for(model: torch.nn.Module, slots: int, slot_tokens: int | None = None) -> SlotPool:
    """A pool shaped for `model` (its config's layers, KV heads and head size)."""
    config = model.config
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = slot_tokens or int(getattr(config, "max_position_embeddings", 2048))
    param = next(model.parameters())
    return SlotPool(config.num_hidden_layers, heads, head_dim, slots, tokens, param.dtype,
                    param.device)
