"""Linear layers that add a per-row blend of stacked LoRA adapters, exactly, in activation space.

Why activation space: the layer is linear, so

    W x + sum_k w_k * s_k * B_k (A_k x)  ==  (W + sum_k w_k * delta_k) x

is TR-Merging's Eq. 9 exactly, with no copy of W, no per-request merge cost, and rows with
different mixes sharing one forward pass. Merging A and B separately with the weights (PEFT's
`linear`, LoRAX) would instead give sum_ij w_i w_j B_i A_j: cross terms and squared weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlendBatch:
    """The adapter mix of every row of one forward pass, shared by all blended layers."""

    used: torch.Tensor  # [U] long: slots used by at least one row (U >= 1)
    used_slots: tuple[int, ...]  # the same, as Python ints
    mix: torch.Tensor  # [batch, U]: mix[b, u] = summed weight of slot used[u] in row b
    # Per-layer gathered factors and per-rank weight columns, computed by the first forward that
    # uses this batch and reused by every later decode step while the batch is unchanged.
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_rows(
        cls, rows: list[list[tuple[int, float]]], device: torch.device, dtype: torch.dtype
    ) -> BlendBatch | None:
        """Build the batch mix from `(slot, weight)` pairs per row; None when no row blends."""
        used = sorted({slot for row in rows for slot, weight in row if weight != 0.0})
        if not used:
            return None
        column = {slot: u for u, slot in enumerate(used)}
        mix = torch.zeros(len(rows), len(used), dtype=torch.float32)
        for b, row in enumerate(rows):
            for slot, weight in row:
                if weight != 0.0:
                    mix[b, column[slot]] += weight
        return cls(
            used=torch.tensor(used, dtype=torch.long, device=device),
            used_slots=tuple(used),
            mix=mix.to(device=device, dtype=dtype),
        )


class BlendContext:
    """Holds the current forward pass's `BlendBatch`.

    Whoever runs a forward pass (the scheduler; TE's activation collection) holds the engine's
    model lock while it sets, uses and clears this, so a plain attribute is enough.
    """

    def __init__(self) -> None:
        self.batch: BlendBatch | None = None


class BlendedLoRALinear(nn.Module):
    """A base `nn.Linear` plus stacked LoRA slots blended per row.

    Semantics::

        y[b] = W x[b] + sum_u mix[b, u] * B[used[u]] (A[used[u]] x[b])
             = W x[b] + sum_k w[b, k] * s[k] * B_k (A_k x[b])     (scaling s folded into B)

    Shapes::

        A:  [slots, r_max, in]   lora_A of every slot, ranks zero-padded to r_max
        Bt: [slots, r_max, out]  (s * lora_B)^T, stored transposed so that a gather of the
                                 used slots is one contiguous [U * r_max, out] matrix

    Slot tensors are allocated on first use, so modules no adapter targets cost nothing.

    Virtual adapters (merged results of non-linear methods) live beside the stacks, in `side`:
    `(A [r, in], Bt [r, out])` of any rank, or a dense delta `[out, in]`, so that one large
    merge does not grow r_max for every slot. For them::

        y[b] += mix[b, u] * (x[b] A^T) Bt      or      y[b] += mix[b, u] * x[b] D^T
    """

    def __init__(self, base: nn.Linear | Conv1D, context: BlendContext, num_slots: int) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.num_slots = num_slots
        self.A: torch.Tensor | None = None
        self.Bt: torch.Tensor | None = None
        self.side: dict[int, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}

    @property
    def in_features(self) -> int:
        return self.base.nx if isinstance(self.base, Conv1D) else self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.nf if isinstance(self.base, Conv1D) else self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as [out, in] (transformers' Conv1D stores it transposed; PEFT's
        LoRA factors of a Conv1D layer are still A [r, in], B [out, r])."""
        weight = self.base.weight
        return weight.T if isinstance(self.base, Conv1D) else weight

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Write one adapter's factors (A [r, in], B [out, r]) into `slot`."""
        rank = A.shape[0]
        self._ensure_capacity(rank)
        assert self.A is not None and self.Bt is not None
        self.A[slot].zero_()
        self.Bt[slot].zero_()
        self.A[slot, :rank] = A.to(self.A)
        self.Bt[slot, :rank] = (scaling * B.float()).T.to(self.Bt)

    def set_side(self, slot: int, A: torch.Tensor | None, B: torch.Tensor) -> None:
        """Store a virtual adapter: factors (A [r, in], B [out, r]), or with A None a dense
        delta B [out, in]."""
        like = self.weight
        if A is None:
            self.side[slot] = B.to(like).contiguous()
        else:
            self.side[slot] = (A.to(like).contiguous(), B.to(like).T.contiguous())

    def clear_slot(self, slot: int) -> None:
        self.side.pop(slot, None)
        if self.A is not None and self.Bt is not None:
            self.A[slot].zero_()
            self.Bt[slot].zero_()

    def reserve(self, rank: int) -> None:
        """Allocate the stacks for adapters up to `rank` now, so that no later load has to
        grow them (a growth copies every slot, under the model lock)."""
        self._ensure_capacity(rank)

    def _ensure_capacity(self, rank: int) -> None:
        """Allocate the slot stacks, or grow r_max (zero padding is exact) for a larger rank."""
        weight = self.weight
        have = 0 if self.A is None else self.A.shape[1]
        if rank <= have:
            return
        A = weight.new_zeros(self.num_slots, rank, self.in_features)
        Bt = weight.new_zeros(self.num_slots, rank, self.out_features)
        if self.A is not None and self.Bt is not None:
            A[:, :have] = self.A
            Bt[:, :have] = self.Bt
        self.A, self.Bt = A, Bt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.context.batch
        if batch is None or (self.A is None and not self.side):
            return y  # no adapter targets this layer (most of them, once every layer is wrapped)
        # Rows come from the batch, never from x's shape: some models (OPT's fc1/fc2) flatten
        # [B, T, H] to [B*T, H] before a linear layer. Rows are contiguous in either layout.
        rows = batch.mix.shape[0]
        flat = x.reshape(-1, self.in_features)  # [rows * tokens, in]
        out = y.view(-1, self.out_features)  # a view: the in-place adds below land in y
        if self.A is not None:
            A, Bt, scale = self._gathered(batch)
            # 2-D and in place: the LoRA terms are tiny, so per-op overhead is most of their
            # cost on CPU (measured: decode step at batch 16 -7% against `y + (h * s) @ Bt`).
            h = torch.mm(flat, A.t())  # [rows * tokens, U * r]
            h.view(rows, -1, h.shape[-1]).mul_(scale)
            out.addmm_(h, Bt)
        if self.side:
            for u, slot in enumerate(batch.used_slots):
                part = self.side.get(slot)
                if part is None:
                    continue
                # only the rows that use this merge pay for it (a dense slot is a full
                # [out, in] matmul: as costly as the base layer itself)
                used_rows = batch.memo.get(("side_rows", u))
                if used_rows is None:
                    used_rows = batch.mix[:, u].nonzero().flatten()
                    batch.memo[("side_rows", u)] = used_rows
                if used_rows.numel() == 0:
                    continue
                every = used_rows.numel() == rows
                xs = flat.view(rows, -1, self.in_features)
                xs = xs if every else xs.index_select(0, used_rows)
                weight = batch.mix.index_select(0, used_rows)[:, u, None, None]  # [n, 1, 1]
                if isinstance(part, tuple):
                    delta = weight * ((xs @ part[0].T) @ part[1])
                else:
                    delta = weight * (xs @ part.T)
                by_row = out.view(rows, -1, self.out_features)
                if every:
                    by_row.add_(delta)
                else:
                    by_row.index_add_(0, used_rows, delta)
        return y

    def _gathered(self, batch: BlendBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The used slots' factors, [U * r, in] and [U * r, out], and their row weights."""
        assert self.A is not None and self.Bt is not None
        found = batch.memo.get(id(self))
        if found is None:
            used, rank = batch.used.shape[0], self.A.shape[1]
            A = self.A.index_select(0, batch.used).reshape(used * rank, self.in_features)
            Bt = self.Bt.index_select(0, batch.used).reshape(used * rank, self.out_features)
            scale = batch.memo.get(("scale", rank))
            if scale is None:
                # Each slot's r hidden units carry that slot's weight for the row.
                scale = batch.mix.repeat_interleave(rank, dim=1).unsqueeze(1)  # [batch, 1, U*r]
                batch.memo[("scale", rank)] = scale
            found = batch.memo[id(self)] = (A, Bt, scale)
        return found


def is_linear_like(module: nn.Module) -> bool:
    """A layer PEFT's LoRA can target as a linear map: nn.Linear or transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def install_blended_layers(
    model: nn.Module, target_names: Iterable[str] | None, context: BlendContext, num_slots: int
) -> dict[str, BlendedLoRALinear]:
    """Replace linear-like layers by blended layers.

    Every linear-like layer (fused projections such as Phi-3's `qkv_proj` and the output
    head included) is wrapped, so whatever an adapter targets can be served; a layer no
    adapter uses holds no slot tensors and costs one Python call per forward. `target_names`
    (last name parts), when given, restricts the set; a name in it that matches no layer is
    logged as a warning, never silently dropped.

    Returns:
        `{full module name: layer}`, names as in `model.named_modules()` before the swap.
    """
    wanted = None if target_names is None else set(target_names)
    layers: dict[str, BlendedLoRALinear] = {}
    seen: set[str] = set()
    for name, module in list(model.named_modules()):
        if not is_linear_like(module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        seen.add(leaf)
        if wanted is not None and leaf not in wanted:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BlendedLoRALinear(module, context, num_slots)
        setattr(parent, child, layer)
        layers[name] = layer
    for missing in sorted((wanted or set()) - seen):
        log.warning("lora_target_modules names %r, which matches no linear layer of the base "
                    "model", missing)
    return layers
