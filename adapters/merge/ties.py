"""`ties`: TIES-Merging (trim, elect sign, disjoint mean), PEFT semantics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.merge.base import (
    MAJORITY_SIGN_METHODS,
    MergeMethod,
    MergeParams,
    ModuleInputs,
    check_choice,
    check_deltas,
    check_number,
    weight_tensor,
)
from adapters.merge.ops import elect_and_mean, elected_contributions, l1_removed, magnitude_mask


@dataclass(frozen=True)
class TiesParams(MergeParams):
    density: float = 0.2
    """Fraction of each task vector's entries kept by magnitude, in (0, 1] (TIES paper: 0.2)."""
    majority_sign_method: str = "total"
    """"total": sign of the sum; "frequency": sign of the count of signs."""

    def __post_init__(self) -> None:
        check_number("density", self.density, lo=0.0, hi=1.0, lo_open=True)
        check_choice("majority_sign_method", self.majority_sign_method, MAJORITY_SIGN_METHODS)


class TiesMerge(MergeMethod[TiesParams, Tensor]):
    """Semantics (equal to `peft.utils.merge_utils.ties`):
        prepare:  t_i = delta_i * topk_mask(|delta_i|, density)          [out, in]
        combine:  agree[i] = sign(t_i) == elect(t_1..t_K)   (elected on UNweighted t_i)
                  merged = sum_i w_i t_i agree[i] / max(1, sum_i agree[i])

    The divisor is a count, not a weight sum, as in PEFT. Pass only the selected adapters:
    an entry at weight 0 still votes in the election and counts in the divisor. One adapter
    at weight 1 gives its trimmed delta back, so the adapter itself only at density 1. With
    non-negative weights no output entry mixes signs (a negative weight flips its values
    after the election).
    """

    name = "ties"
    params_type = TiesParams
    exact_single = False
    prunes = True

    def prepare(self, deltas: Sequence[Tensor], params: TiesParams,
                inputs: ModuleInputs | None = None) -> list[Tensor]:
        """Trim each delta to its top-`density` magnitudes (zeros elsewhere), [out, in]."""
        check_deltas(deltas, self.name)
        return [d * magnitude_mask(d, params.density) for d in deltas]

    def combine(self, prepared: Sequence[Tensor], weights: Tensor | Sequence[float],
                params: TiesParams) -> Tensor:
        check_deltas(prepared, self.name)
        w = weight_tensor(weights, len(prepared), prepared[0], self.name)
        return elect_and_mean(torch.stack(list(prepared)), w, params.majority_sign_method)

    def contributions(self, prepared: Sequence[Tensor], params: TiesParams) -> Tensor:
        check_deltas(prepared, self.name)
        return elected_contributions(torch.stack(list(prepared)), params.majority_sign_method)

    def removed_l1_fraction(self, delta: Tensor, prepared: Tensor, params: TiesParams) -> float:
        return l1_removed(delta, prepared)
