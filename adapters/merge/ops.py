"""Tensor building blocks shared by several methods (trim, elect sign, disjoint mean).

They follow `peft.utils.merge_utils` exactly (same top-k call, same tie rule for the sign
election), so our TIES and DARE-TIES equal PEFT's on the same inputs and masks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_mask(t: Tensor, density: float) -> Tensor:
    """Keep the `int(density * numel)` largest-magnitude entries (PEFT's rule, floor).

    Args:
        t: a task vector, any shape.
        density: fraction of entries to keep; >= 1 keeps all.

    Returns:
        Bool mask, same shape as `t`.
    """
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.reshape(t.shape)


def majority_sign_mask(stacked: Tensor, method: str) -> Tensor:
    """TIES "elect sign": which entries agree with the elected sign.

    Semantics:
        total:     elected = sign(sum_k stacked[k])          (ties -> +1)
        frequency: elected = sign(sum_k sign(stacked[k]))    (ties -> +1)
        mask[k] = sign(stacked[k]) == elected                (zeros never agree)

    Args:
        stacked: [K, ...] task vectors (PEFT elects on them before weighting).
        method: "total" or "frequency".

    Returns:
        Bool mask [K, ...].
    """
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == elected


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """TIES "disjoint merge": mean over the entries that agree with the elected sign.

    Semantics:
        out[...] = sum_k weighted[k] * mask[k] / max(1, sum_k mask[k])

    The divisor counts agreeing tasks, not their weights (PEFT semantics): with routing
    weights that sum to 1, K agreeing tasks give roughly 1/K of a single task's strength.
    """
    kept = (weighted * mask).sum(dim=0)
    return kept / mask.sum(dim=0).clamp(min=1).to(weighted.dtype)


def elect_and_mean(stacked: Tensor, weights: Tensor, method: str) -> Tensor:
    """Elect sign on `stacked` [K, ...], then the disjoint mean of `weights[k] * stacked[k]`."""
    mask = majority_sign_mask(stacked, method)
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - 1))
    return disjoint_mean(stacked * w, mask)


def elected_contributions(stacked: Tensor, method: str) -> Tensor:
    """`elect_and_mean` split per task before weighting: E[k] = stacked[k] * agree[k] / count.

    Semantics:
        elect_and_mean(stacked, w, method) == sum_k w[k] * E[k]      for every w
    (the election and the divisor do not look at the weights).
    """
    mask = majority_sign_mask(stacked, method)
    count = mask.sum(dim=0, dtype=stacked.dtype).clamp_(min=1)
    return stacked.mul(mask).div_(count)


def weighted_sum(stacked: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[k] * stacked[k] for stacked [K, out, in] and weights [K]."""
    return torch.einsum("k,koi->oi", weights, stacked)


def l1_removed(original: Tensor, kept: Tensor) -> float:
    """1 - |kept|_1 / |original|_1 (0 for a zero `original`)."""
    total = float(original.abs().sum())
    return 0.0 if total == 0 else 1.0 - float(kept.abs().sum()) / total
