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

    def begin_decode(self, hi: int, views: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a decode step over slots `0..hi-1`; returns its attention mask
        `[hi, width+1]` and the column each row's new token goes to. Free slots attend to
        one stale column so that no row is fully masked; their outputs are ignored.
        `views`: set the layers' cache views for transformers' forward (the lean forward
        reads the buffers itself)."""
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
        if views:
            for layer in self.layers:
                layer.begin(hi, width, lens)
        return mask, lens

    def end_decode(self, hi: int) -> None:
        for slot in range(hi):
            if self.used[slot]:
                self.lens[slot] += 1


def decode_attention_mask(
    config: object, mask: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The decode step's mask as the model takes it. Rows are left-aligned, so each row's new
    token sits at its own column (`lens[row]`); transformers draws a sliding window from one
    query position for the whole batch, which is right for the longest row only. Models with
    sliding-window layers therefore get 4-D masks built here, per row (a window keeps the
    last `sliding_window` tokens, the new one included); the others keep the 2-D mask."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return mask
    cols = torch.arange(mask.shape[1], device=mask.device)
    full = mask.bool()
    slide = full & (cols[None, :] > lens[:, None] - window)

    def shaped(keep: torch.Tensor) -> torch.Tensor:
        keep = keep[:, None, None, :]  # [rows, 1, query, columns]
        if getattr(config, "_attn_implementation", "sdpa") != "eager":
            return keep
        dtype = getattr(config, "dtype", None) or torch.float32
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min)

    if types is None:
        return shaped(slide)
    return {"full_attention": shaped(full), "sliding_attention": shaped(slide)}


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """Layers, KV heads and head size, read from the cache of a one-token forward: configs
    do not say them uniformly (GPT-NeoX ignores `num_key_value_heads`, some models set
    `head_dim` apart from hidden / heads), the cache the model really writes does."""
    param = next(model.parameters())
    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device),
                    use_cache=True)
    layers = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in out.cache.layers]
    if len(set(layers)) != 1:
        raise ValueError(f"layers with different KV shapes are not supported: {set(layers)}")
    heads, head_dim = layers[0]
    return len(layers), heads, head_dim


def pool_for(model: torch.nn.Module, slots: int, slot_tokens: int | None = None) -> SlotPool:
    """A pool shaped for `model` (the layers, KV heads and head size its cache holds)."""
    layers, heads, head_dim = kv_shape(model)
    tokens = slot_tokens or int(getattr(model.config, "max_position_embeddings", 2048))
    param = next(model.parameters())
    return SlotPool(layers, heads, head_dim, slots, tokens, param.dtype, param.device)
