"""`twin`: Twin-Merging: a shared expert plus SVD-compressed exclusive parts.

The shared expert is the task-arithmetic merge of all loaded adapters (weight 1/N, or a
configured `shared_weight`); each adapter's exclusive knowledge is what it adds on top,
`delta_i - shared`, compressed to rank r. Per request the router's weights mix the exclusive
parts on top of the always-present shared expert. Everything per request is linear, so the
result is returned as low-rank factors too (`combine_factors`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.merge.base import (
    MergeMethod,
    MergeParams,
    ModuleInputs,
    check_deltas,
    check_int,
    check_number,
    weight_tensor,
)
from adapters.merge.svd import exact_low_rank, truncated_svd

_set_tokens = itertools.count()


@dataclass(frozen=True)
class TwinParams(MergeParams):
    rank: int = 16
    """Rank r of each exclusive part, >= 1 (capped at min(out, in), where it is exact)."""
    shared_weight: float | None = None
    """Weight of every adapter in the shared expert; None = 1/N over the prepared set."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, lo=1)
        if self.shared_weight is not None:
            check_number("shared_weight", self.shared_weight)


@dataclass(frozen=True)
class TwinPrepared:
    """One adapter's exclusive part, with the module's shared expert (same for the set)."""

    shared_b: Tensor  # [out, r_s]  shared expert at its numerical rank, shared = B_s @ A_s
    shared_a: Tensor  # [r_s, in]
    exclusive_b: Tensor  # [out, r]  rank-r approximation of delta_i - shared
    exclusive_a: Tensor  # [r, in]
    set_token: int  # entries from one `prepare` call share it; mixing sets is an error


class TwinMerge(MergeMethod[TwinParams, TwinPrepared]):
    """Semantics (N prepared adapters; the request selects K of them):
        prepare:  shared = lam * sum_{i<N} delta_i                  lam = shared_weight or 1/N
                  B_i, A_i = truncated_svd(delta_i - shared, rank)
        combine:  merged = shared + sum_{k<K} w_k B_k A_k
                  factors: B = [B_s | w_1 B_1 | ...], A = [A_s; A_1; ...]

    One adapter at weight 1 (others 0, or absent) gives that adapter back when `rank` covers
    the rank of `delta_i - shared` (always at rank >= min(out, in)); else up to the SVD error.
    """

    name = "twin"
    params_type = TwinParams
    set_dependent = True  # the shared expert is built from every loaded adapter
    exact_single = False  # only when `rank` covers delta_i - shared

    def prepare(self, deltas: Sequence[Tensor], params: TwinParams,
                inputs: ModuleInputs | None = None) -> list[TwinPrepared]:
        check_deltas(deltas, self.name)
        stacked = torch.stack(list(deltas))
        lam = params.shared_weight if params.shared_weight is not None else 1.0 / len(deltas)
        shared = lam * stacked.sum(dim=0)
        shared_b, shared_a = exact_low_rank(shared)
        token = next(_set_tokens)
        return [
            TwinPrepared(shared_b, shared_a, *truncated_svd(d - shared, params.rank), token)
            for d in deltas
        ]

    def combine_factors(self, prepared: Sequence[TwinPrepared],
                        weights: Tensor | Sequence[float],
                        params: TwinParams) -> tuple[Tensor, Tensor]:
        """The merged delta as (B [out, r_s + sum r_k], A [r_s + sum r_k, in])."""
        if len(prepared) == 0:
            raise ValueError(f"{self.name}: at least one adapter is needed")
        if len({p.set_token for p in prepared}) != 1:
            raise ValueError(f"{self.name}: entries come from different preparations")
        first = prepared[0]
        w = weight_tensor(weights, len(prepared), first.shared_b, self.name)
        b = torch.cat([first.shared_b] + [wk * p.exclusive_b for wk, p in zip(w, prepared,
                                                                             strict=True)], dim=1)
        a = torch.cat([first.shared_a] + [p.exclusive_a for p in prepared], dim=0)
        return b, a

    def combine(self, prepared: Sequence[TwinPrepared], weights: Tensor | Sequence[float],
                params: TwinParams) -> Tensor:
        b, a = self.combine_factors(prepared, weights, params)
        return b @ a
