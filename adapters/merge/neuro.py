"""`neuro`: NeuroMerging (Fang et al. 2025), merging in per-neuron subspaces.

For output neuron k (row k of the module weight) with pre-trained row `w_k` and unit
`u_k = w_k / |w_k|`, a task vector row `tau_k` splits into the part parallel to `w_k`
(`(tau_k . u_k) u_k`, "neuron sensitivity") and the orthogonal rest ("input adaptability").
The paper keeps the orthogonal parts (`lambda_1 = 0`), merges them with TIES' elect + mean,
and rescales by `lambda_2 = 1 / (1 - sigma)`.

Where the paper is ambiguous, and what we chose:
- Mask before split: Algorithm 1 masks each task vector to its top-r% magnitudes first, then
  decomposes the masked rows. We do the same; the mask is per module (TIES' granularity),
  r = 0.15 as the paper's default without validation data.
- sigma: the text defines `sigma_t` as the L1 of the zeroed-out entries over the L1 of the
  whole task vector, `sigma = max_t sigma_t`; Algorithm 1 places it inside the per-neuron
  loop. A per-neuron ratio on a handful of surviving entries is noise, and the reported
  lambda_2 of ~3.6 at r = 10% matches the task-vector reading, so sigma_t is per module,
  computed at preparation, and the max is over the request's selected adapters.
- Orthogonal merge: the text projects the orthogonal parts on the SVD basis of the tasks'
  orthogonal vectors at that neuron (rank = number of tasks), elects sign and means along
  each basis direction, and maps back (`orthogonal_merge="svd"`, default). Coordinate-wise
  elect + mean (`"coordinate"`) is offered too; since a coordinate-wise selection is not a
  combination of the orthogonal rows, its result is projected back onto the orthogonal
  complement so that `lambda_1 = 0` still means "nothing along w_k".
- Weights: the paper merges with uniform weights. A request's weights enter as in PEFT's
  TIES: the sign is elected on unweighted values, the mean is over weighted values.
- lambda_1 != 0: the parallel coefficients `tau_k . u_k` are merged with elect + mean too.
"""

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
    inputs_for,
    weight_tensor,
)
from adapters.merge.ops import (
    elect_and_mean,
    elected_contributions,
    l1_removed,
    magnitude_mask,
)

ORTHOGONAL_MERGES = ("svd", "coordinate")
_SNAP_RTOL = 1e-5  # SVD coordinates below this fraction of a neuron's s_max are round-off


@dataclass(frozen=True)
class NeuroParams(MergeParams):
    mask_ratio: float = 0.15
    """Fraction r of each task vector's entries kept by magnitude, in (0, 1] (paper: 0.15)."""
    lambda_1: float = 0.0
    """Scale of the merged parallel parts (paper without validation data: 0)."""
    lambda_2: float | None = None
    """Scale of the merged orthogonal parts; None = 1 / (1 - sigma) from the masked L1."""
    majority_sign_method: str = "total"
    """"total" or "frequency", as in TIES."""
    orthogonal_merge: str = "svd"
    """"svd" (the paper) or "coordinate" (plain TIES on the orthogonal rows)."""

    def __post_init__(self) -> None:
        check_number("mask_ratio", self.mask_ratio, lo=0.0, hi=1.0, lo_open=True)
        check_number("lambda_1", self.lambda_1)
        if self.lambda_2 is not None:
            check_number("lambda_2", self.lambda_2)
        check_choice("majority_sign_method", self.majority_sign_method, MAJORITY_SIGN_METHODS)
        check_choice("orthogonal_merge", self.orthogonal_merge, ORTHOGONAL_MERGES)


@dataclass(frozen=True)
class NeuroPrepared:
    """One adapter's masked task vector, split per neuron."""

    orthogonal: Tensor  # [out, in]  masked rows minus their part along u_k
    parallel: Tensor  # [out]  coefficient of each masked row along u_k
    unit_rows: Tensor  # [out, in]  u_k; one tensor shared by all adapters of the module
    sigma: float  # L1 of the masked-out entries / L1 of the whole delta, in [0, 1]


def unit_rows(base_weight: Tensor) -> Tensor:
    """Rows of the pre-trained weight scaled to unit norm; zero rows stay zero (no direction)."""
    w = base_weight.float()
    norms = w.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, w / norms.clamp(min=torch.finfo(w.dtype).tiny), 0.0)


def split_rows(rows: Tensor, unit: Tensor) -> tuple[Tensor, Tensor]:
    """Per row k: (c_k = rows_k . u_k  [out],  orthogonal part rows_k - c_k u_k  [out, in])."""
    coef = (rows * unit).sum(dim=1)
    return coef, rows - coef[:, None] * unit


def neuron_bases(orth: Tensor) -> tuple[Tensor, Tensor]:
    """Per neuron o, the thin SVD of T[o] = orth[:, o, :] ([K tasks, in]) as (coordinates
    C = U S [out, K, K dirs], directions Vh [out, K dirs, in]), round-off coordinates snapped
    to 0.

    Computed from the K x K Gram matrix T T^T = U S^2 U^T (in float64) instead of a batched
    SVD of the [K, in] rows: K is the handful of selected adapters, so this is one batched
    matmul and `out` eigendecompositions of K x K, ~10x faster than LAPACK's SVD of each
    [K, in] row block on the demo's largest module, and as exact (float64 Gram: its squared
    condition number stays far above fp32's resolution). Directions whose singular value is
    round-off get Vh = 0; their coordinates are snapped to 0 anyway. Signs of (U_j, Vh_j) are
    arbitrary as in any SVD; elect + mean is invariant to flipping both.
    """
    work = orth.transpose(0, 1).double()  # [out, K, in]
    eigvals, u = torch.linalg.eigh(work @ work.transpose(1, 2))  # ascending
    s = eigvals.flip(-1).clamp(min=0.0).sqrt()  # [out, K] descending
    u = u.flip(-1)
    tol = _SNAP_RTOL * s[:, :1]
    kept = s > tol
    inverse = torch.where(kept, 1.0 / torch.where(kept, s, 1.0), 0.0)
    vh = inverse[:, :, None] * (u.transpose(1, 2) @ work)  # S^-1 U^T T
    coords = u * s[:, None, :]
    coords = torch.where(coords.abs() <= tol[:, :, None], 0.0, coords)
    return coords.float(), vh.float()


def _merge_svd(orth: Tensor, w: Tensor, method: str) -> Tensor:
    """Per neuron: SVD basis of the K orthogonal rows, elect + mean per basis direction.

    Semantics:
        T[o] = orth[:, o, :]                       [K, in] (tasks x input)
        T[o] = U S Vh;  C = U S                    [K tasks, K dirs]: coordinates
        c[j] = elect_mean_k(C[k, j], w[k])         (round-off coordinates snapped to 0)
        out[o] = sum_j c[j] Vh[j]                  stays in span(T[o]), hence orthogonal to u_o
    """
    coords, vh = neuron_bases(orth)
    merged = elect_and_mean(coords.transpose(0, 1), w.float(), method)  # [out, K dirs]
    return torch.einsum("oj,oji->oi", merged, vh).to(orth.dtype)


def _contributions_svd(orth: Tensor, method: str) -> Tensor:
    """`_merge_svd` split per task before weighting: [K, out, in] (same basis, same snap)."""
    coords, vh = neuron_bases(orth)
    per_task = elected_contributions(coords.transpose(0, 1), method)  # [K, out, K dirs]
    return torch.einsum("koj,oji->koi", per_task, vh).to(orth.dtype)


def _merge_coordinate(orth: Tensor, w: Tensor, method: str, unit: Tensor) -> Tensor:
    merged = elect_and_mean(orth, w, method)
    return split_rows(merged, unit)[1]


class NeuroMerge(MergeMethod[NeuroParams, NeuroPrepared]):
    """Semantics (per module; W = pre-trained weight [out, in], u_k = W[k] / |W[k]|):
        prepare:  tau_i = delta_i * topk_mask(|delta_i|, r)
                  sigma_i = |delta_i - tau_i|_1 / |delta_i|_1
                  par_i[k] = tau_i[k] . u_k;   orth_i[k] = tau_i[k] - par_i[k] u_k
        combine:  lambda_2 = 1 / (1 - max_i sigma_i)    (unless given)
                  merged[k] = lambda_1 * elect_mean_i(par_i[k], w_i) u_k
                            + lambda_2 * psi_orth(orth_1[k] .. orth_K[k]; w)

    Not exact for one adapter at default parameters (parallel part dropped, masked, scaled);
    exact with mask_ratio=1, lambda_1=1, lambda_2=None (sigma=0).
    """

    name = "neuro"
    params_type = NeuroParams
    needs = frozenset({"base_weight"})
    exact_single = False
    prunes = True

    def prepare(self, deltas: Sequence[Tensor], params: NeuroParams,
                inputs: ModuleInputs | None = None) -> list[NeuroPrepared]:
        shape = check_deltas(deltas, self.name)
        base = inputs_for(inputs, "base_weight", len(deltas), self.name)
        if base.shape != shape:
            raise ValueError(
                f"{self.name}: base_weight is {tuple(base.shape)}, deltas are {tuple(shape)}"
            )
        unit = unit_rows(base).to(deltas[0].dtype)
        out = []
        for d in deltas:
            tau = d * magnitude_mask(d, params.mask_ratio)
            coef, orth = split_rows(tau, unit)
            out.append(NeuroPrepared(orth, coef, unit, l1_removed(d, tau)))
        return out

    def combine(self, prepared: Sequence[NeuroPrepared], weights: Tensor | Sequence[float],
                params: NeuroParams) -> Tensor:
        check_deltas([p.orthogonal for p in prepared], self.name)
        unit = prepared[0].unit_rows
        w = weight_tensor(weights, len(prepared), unit, self.name)
        orth = torch.stack([p.orthogonal for p in prepared])
        if params.orthogonal_merge == "svd":
            merged = _merge_svd(orth, w, params.majority_sign_method)
        else:
            merged = _merge_coordinate(orth, w, params.majority_sign_method, unit)
        merged = merged * self.lambda_2(prepared, params)
        if params.lambda_1 != 0:
            coef = elect_and_mean(torch.stack([p.parallel for p in prepared]), w,
                                  params.majority_sign_method)
            merged = merged + params.lambda_1 * coef[:, None] * unit
        return merged

    def contributions(self, prepared: Sequence[NeuroPrepared], params: NeuroParams) -> Tensor:
        check_deltas([p.orthogonal for p in prepared], self.name)
        unit = prepared[0].unit_rows
        orth = torch.stack([p.orthogonal for p in prepared])
        if params.orthogonal_merge == "svd":
            out = _contributions_svd(orth, params.majority_sign_method)
        else:  # the projection back onto the orthogonal complement is linear: per task
            per_task = elected_contributions(orth, params.majority_sign_method)
            out = per_task - (per_task * unit).sum(dim=2, keepdim=True) * unit
        out = out * self.lambda_2(prepared, params)
        if params.lambda_1 != 0:
            coef = elected_contributions(torch.stack([p.parallel for p in prepared]),
                                         params.majority_sign_method)  # [K, out]
            out = out + params.lambda_1 * coef[:, :, None] * unit
        return out

    @staticmethod
    def lambda_2(prepared: Sequence[NeuroPrepared], params: NeuroParams) -> float:
        """The configured lambda_2, else 1 / (1 - max sigma) over the selected adapters."""
        if params.lambda_2 is not None:
            return params.lambda_2
        sigma = max(p.sigma for p in prepared)
        # sigma = 1 only when the mask kept nothing: the merged part is zero, any scale will do
        return 1.0 if sigma >= 1.0 else 1.0 / (1.0 - sigma)

    def removed_l1_fraction(self, delta: Tensor, prepared: NeuroPrepared,
                            params: NeuroParams) -> float:
        return prepared.sigma
