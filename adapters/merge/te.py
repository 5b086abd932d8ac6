"""`te`: TE-Merging: prune task-irrelevant neurons by mutual information, merge hierarchically.

What we have of TE-Merging is its README: neurons are scored by their mutual information with
"task-specific signals", low-relevance neurons are pruned, and the rest are merged
hierarchically, "preserving core domain-specific knowledge while integrating cross-domain
information". The concrete choices, ours:
- Neuron = output row k of the task vector. Its signal on an input x is the magnitude of its
  delta activation, `a_k(x) = |delta_i[k] . x|`.
- Relevance = MI between `a_k(x)` and the binary label "x is an exemplar of task i" over the
  pooled exemplars of all tasks (task i's positives, the others' negatives), estimated with
  an equal-frequency histogram (`n_bins` quantile bins per neuron, ties kept in one bin so a
  constant activation scores exactly 0). MI is symmetric: a neuron that fires for the other
  tasks and not its own also scores high; both are task-specific.
- Without other tasks' exemplars MI is undefined (one class); relevance falls back to the
  mean activation on the task's own exemplars.
- Each task keeps the top `keep_ratio` rows (ceil, at least one); default 0.5, a guess.
- Hierarchical merge per request: a row kept by two or more selected adapters (weight != 0)
  is their weighted sum; a row kept by exactly one is that adapter's row at full strength
  (weight sign(w), `exclusive_full=True`: "core domain-specific knowledge" is preserved even
  when the router gives the task a small weight) or at its weight (`exclusive_full=False`,
  which makes the merge plain task arithmetic on the pruned deltas).

Pruning is a row mask on the delta (on B, for a LoRA delta), and the combination is a per-row
coefficient on each delta (`row_coefficients`): a merge of K rank-r adapters keeps rank <= K r,
which "exact" storage turns back into compact factors (adapters.virtual).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.merge.base import (
    MergeMethod,
    MergeParameterError,
    MergeParams,
    ModuleInputs,
    check_deltas,
    check_int,
    check_number,
    inputs_for,
    weight_tensor,
)
from adapters.merge.ops import l1_removed


@dataclass(frozen=True)
class TeParams(MergeParams):
    keep_ratio: float = 0.5
    """Fraction of each task vector's rows (output neurons) kept, in (0, 1]."""
    n_bins: int = 8
    """Equal-frequency bins of the histogram MI estimate, >= 2."""
    exclusive_full: bool = True
    """Rows kept by one selected adapter only: weight sign(w) (True) or w (False)."""

    def __post_init__(self) -> None:
        check_number("keep_ratio", self.keep_ratio, lo=0.0, hi=1.0, lo_open=True)
        check_int("n_bins", self.n_bins, lo=2)
        if not isinstance(self.exclusive_full, bool):
            raise MergeParameterError(
                f"exclusive_full must be a bool, got {self.exclusive_full!r}", "exclusive_full")


@dataclass(frozen=True)
class TePrepared:
    """One adapter's delta with its relevance-pruning row mask."""

    delta: Tensor  # [out, in]  unpruned; combine applies the mask
    row_mask: Tensor  # [out] bool  rows kept (apply to B: B * row_mask[:, None])
    relevance: Tensor  # [out]  MI in nats (or mean activation, see module doc)


def histogram_mi(act: Tensor, label: Tensor, n_bins: int) -> Tensor:
    """MI between each column of `act` and a binary `label`, by equal-frequency binning.

    Semantics:
        edges[:, o] = quantiles of act[:, o] at 1/n_bins .. (n_bins-1)/n_bins
        bin[n, o]   = #{edges[:, o] < act[n, o]}        (ties share a bin)
        MI[o] = sum_{b, y} p(b, y) log(p(b, y) / (p(b) p(y)))   in nats

    Args:
        act: [n, out] activations.
        label: [n] bool or {0, 1}.
        n_bins: bins per column.

    Returns:
        [out] MI estimates, >= 0.
    """
    n, out = act.shape
    srt = act.sort(dim=0).values
    pos = torch.arange(1, n_bins, device=act.device) * (n - 1) // n_bins
    bins = torch.zeros(n, out, dtype=torch.long, device=act.device)
    for edge in srt[pos]:  # one edge row at a time keeps memory at O(n * out)
        bins += act > edge
    y = label.to(torch.long).reshape(-1, 1).expand(n, out)
    joint = torch.zeros(out, 2 * n_bins, dtype=torch.float64, device=act.device)
    joint.scatter_add_(1, (bins * 2 + y).T, torch.ones(out, n, dtype=torch.float64,
                                                          device=act.device))
    p = (joint / n).reshape(out, n_bins, 2)
    indep = p.sum(dim=2, keepdim=True) * p.sum(dim=1, keepdim=True)
    terms = torch.where(p > 0, p * (p / indep.clamp(min=1e-300)).log(), 0.0)
    return terms.sum(dim=(1, 2)).clamp(min=0).to(act.dtype)


def relevance(delta: Tensor, own: Tensor, others: Tensor, n_bins: int) -> Tensor:
    """Relevance of each row of `delta` to its task, [out] (see the module doc).

    Args:
        delta: [out, in] task vector.
        own: [n, in] module inputs on the task's exemplars.
        others: [m, in] module inputs on the other tasks' exemplars (m may be 0).
    """
    own_act = (own.to(delta.dtype) @ delta.T).abs()
    if others.shape[0] == 0:
        return own_act.mean(dim=0)
    act = torch.cat([own_act, (others.to(delta.dtype) @ delta.T).abs()])
    label = torch.cat([torch.ones(own.shape[0]), torch.zeros(others.shape[0])]).to(act.device)
    return histogram_mi(act, label, n_bins)


def top_rows_mask(score: Tensor, keep_ratio: float) -> Tensor:
    """Bool [out]: the ceil(keep_ratio * out) highest-scoring rows (at least one)."""
    k = max(1, math.ceil(keep_ratio * score.numel()))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[torch.topk(score, k=k).indices] = True
    return mask


def row_coefficients(row_masks: Tensor, weights: Tensor, exclusive_full: bool) -> Tensor:
    """Per adapter and row, the coefficient of the hierarchical merge.

    Semantics:
        kept[i, k]  = row_masks[i, k] and weights[i] != 0
        shared[k]   = sum_i kept[i, k] >= 2
        coef[i, k]  = kept[i, k] * (weights[i] if shared[k] or not exclusive_full
                                    else sign(weights[i]))
        merged      = sum_i coef[i, :, None] * delta_i  = sum_i (coef[i, :, None] * B_i) A_i

    Args:
        row_masks: [K, out] bool.
        weights: [K].

    Returns:
        [K, out] coefficients, `weights`' dtype.
    """
    kept = row_masks & (weights != 0)[:, None]
    shared = kept.sum(dim=0) >= 2
    w = weights[:, None].expand_as(kept)
    exclusive_w = w.sign() if exclusive_full else w
    return torch.where(shared[None, :], w, exclusive_w) * kept


class TeMerge(MergeMethod[TeParams, TePrepared]):
    """Semantics:
        prepare:  rel_i = MI(|X delta_i^T|, [x in task i])  over X = all tasks' exemplars
                  mask_i = top keep_ratio rows of rel_i                               [out]
        combine:  merged = sum_i row_coefficients(mask, w)[i, :, None] * delta_i

    One adapter at weight 1 gives the adapter back only at keep_ratio = 1.
    """

    name = "te"
    params_type = TeParams
    needs = frozenset({"task_inputs"})
    set_dependent = True  # negatives are the other tasks' exemplars
    low_rank_result = True  # row-masked sums of LoRA deltas: rank <= the sum of their ranks
    exact_single = False
    prunes = True

    def prepare(self, deltas: Sequence[Tensor], params: TeParams,
                inputs: ModuleInputs | None = None) -> list[TePrepared]:
        check_deltas(deltas, self.name)
        xs = inputs_for(inputs, "task_inputs", len(deltas), self.name)
        width = deltas[0].shape[1]
        for i, x in enumerate(xs):
            if x.dim() != 2 or x.shape[1] != width:
                raise ValueError(
                    f"{self.name}: task_inputs[{i}] is {tuple(x.shape)}, expected [n, {width}]"
                )
        out = []
        for i, d in enumerate(deltas):
            others = [x for j, x in enumerate(xs) if j != i]
            neg = torch.cat(others) if others else xs[i].new_zeros(0, width)
            rel = relevance(d, xs[i], neg, params.n_bins)
            out.append(TePrepared(d, top_rows_mask(rel, params.keep_ratio), rel))
        return out

    def combine(self, prepared: Sequence[TePrepared], weights: Tensor | Sequence[float],
                params: TeParams) -> Tensor:
        deltas = [p.delta for p in prepared]
        check_deltas(deltas, self.name)
        w = weight_tensor(weights, len(prepared), deltas[0], self.name)
        coef = row_coefficients(torch.stack([p.row_mask for p in prepared]), w,
                                params.exclusive_full)
        return torch.einsum("ko,koi->oi", coef, torch.stack(deltas))

    def removed_l1_fraction(self, delta: Tensor, prepared: TePrepared,
                            params: TeParams) -> float:
        return l1_removed(delta, delta * prepared.row_mask[:, None])
