"""`linear`: task arithmetic on the true deltas (TR-Merging Eq. 9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.merge.base import MergeMethod, MergeParams, ModuleInputs, check_deltas, weight_tensor
from adapters.merge.ops import weighted_sum


@dataclass(frozen=True)
class LinearParams(MergeParams):
    """Task arithmetic has no parameters: the request's weights are the lambdas."""


class LinearMerge(MergeMethod[LinearParams, Tensor]):
    """Semantics:
        merged[out, in] = sum_i w_i * delta_i[out, in]

    This is the dense form of what the engine's blended layer computes in activation space,
    and NOT PEFT's factor-wise `linear` (`(sum w_i B_i)(sum w_j A_j)` has cross terms
    `w_i w_j B_i A_j`): we never combine factors.
    """

    name = "linear"
    params_type = LinearParams

    def prepare(self, deltas: Sequence[Tensor], params: LinearParams,
                inputs: ModuleInputs | None = None) -> list[Tensor]:
        """Nothing to prepare: the entry is the delta itself, [out, in]."""
        check_deltas(deltas, self.name)
        return list(deltas)

    def combine(self, prepared: Sequence[Tensor], weights: Tensor | Sequence[float],
                params: LinearParams) -> Tensor:
        """sum_i w_i * delta_i, [out, in]."""
        check_deltas(prepared, self.name)
        w = weight_tensor(weights, len(prepared), prepared[0], self.name)
        return weighted_sum(torch.stack(list(prepared)), w)
