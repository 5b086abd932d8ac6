"""Interference statistics of a set of task vectors, before merging them.

Inputs are per module: `deltas_by_module[module] = [delta_1, ..., delta_K]` (each [out, in],
one per adapter, same adapter order in every module). Statistics aggregate over modules by
summing the underlying counts or masses, so large modules weigh more, as in the full model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.merge.base import ModuleInputs, check_deltas
from adapters.merge.neuro import split_rows, unit_rows
from adapters.merge.ops import magnitude_mask
from adapters.merge.registry import MERGE_METHODS

Deltas = Mapping[str, Sequence[Tensor]]


def cosine_matrix(deltas_by_module: Deltas) -> Tensor:
    """Pairwise cosine similarity between whole task vectors (all modules flattened).

    Returns:
        [K, K] float64; a zero task vector has cosine 0 with everything.
    """
    gram: Tensor | None = None
    for deltas in deltas_by_module.values():
        check_deltas(deltas, "cosine_matrix")
        flat = torch.stack([d.reshape(-1).double() for d in deltas])
        g = flat @ flat.T
        gram = g if gram is None else gram + g
    if gram is None:
        raise ValueError("cosine_matrix: no modules")
    norms = gram.diagonal().sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp(min=1e-300), 0.0)


def sign_conflicts(deltas: Sequence[Tensor], density: float | None = None) -> tuple[int, int]:
    """Count entries whose nonzero task-vector values disagree in sign.

    Args:
        deltas: K task vectors of one module, [out, in].
        density: if given, trim each to its top-`density` magnitudes first (TIES' view:
            conflicts among the entries that survive trimming).

    Returns:
        (conflicting, eligible): eligible entries have at least two nonzero values.
    """
    check_deltas(deltas, "sign_conflicts")
    stacked = torch.stack([d if density is None else d * magnitude_mask(d, density)
                           for d in deltas])
    pos = (stacked > 0).sum(dim=0)
    neg = (stacked < 0).sum(dim=0)
    eligible = (pos + neg) >= 2
    return int(((pos > 0) & (neg > 0)).sum()), int(eligible.sum())


def sign_conflict_rate(deltas: Sequence[Tensor], density: float | None = None) -> float:
    """conflicting / eligible entries of one module (0 when none is eligible)."""
    bad, total = sign_conflicts(deltas, density)
    return bad / total if total else 0.0


def parallel_energy(deltas: Sequence[Tensor], base_weight: Tensor) -> Tensor:
    """NeuroMerging split: per task, energy parallel and orthogonal to the pre-trained rows.

    Returns:
        [K, 2] float64: (sum_k |par_k|^2, sum_k |orth_k|^2); they add up to |delta|_F^2.
    """
    check_deltas(deltas, "parallel_energy")
    unit = unit_rows(base_weight)
    rows = []
    for d in deltas:
        coef, orth = split_rows(d.float(), unit)
        rows.append([float(coef.double().square().sum()), float(orth.double().square().sum())])
    return torch.tensor(rows, dtype=torch.float64)


@dataclass(frozen=True)
class InterferencePreview:
    """What merging these adapters would fight over."""

    cosine: list[list[float]]  # [K][K] whole-model cosine similarity
    sign_conflict: dict[str, float]  # module -> conflict rate (untrimmed)
    sign_conflict_total: float  # over all modules
    removed_mass: dict[str, list[float]]  # method -> per task fraction of L1 mass removed
    parallel_fraction: list[float] | None  # per task share of energy along W's rows


def preview(deltas_by_module: Deltas, *, base_weights: Mapping[str, Tensor] | None = None,
            task_inputs: Mapping[str, Sequence[Tensor]] | None = None,
            adapter_ids: Sequence[str] | None = None,
            params: Mapping[str, object] | None = None) -> InterferencePreview:
    """All interference statistics for one set of adapters.

    Args:
        deltas_by_module: module -> K deltas [out, in].
        base_weights: module -> pre-trained W [out, in]; enables neuro statistics.
        task_inputs: module -> K exemplar inputs [n_t, in]; enables te's pruned mass.
        adapter_ids: K names, seeding DARE masks as the engine does ("id/module").
        params: method name -> params; defaults otherwise.

    Returns:
        `InterferencePreview`; `removed_mass` lists every registered method that prunes
        and whose required inputs were given.
    """
    if not deltas_by_module:
        raise ValueError("preview: no modules")
    params = params or {}
    conflicts = {m: sign_conflicts(ds) for m, ds in deltas_by_module.items()}
    bad = sum(c for c, _ in conflicts.values())
    eligible = sum(e for _, e in conflicts.values())
    removed: dict[str, list[float]] = {}
    energies: Tensor | None = None
    for module, deltas in deltas_by_module.items():
        inputs = ModuleInputs(
            base_weight=None if base_weights is None else base_weights.get(module),
            task_inputs=None if task_inputs is None else task_inputs.get(module),
            adapter_keys=None if adapter_ids is None else [f"{a}/{module}" for a in adapter_ids],
        )
        l1 = [float(d.abs().sum()) for d in deltas]
        for name, method in MERGE_METHODS.items():
            if not method.prunes or any(getattr(inputs, n) is None for n in method.needs):
                continue
            p = params.get(name) or method.params()
            fracs = [method.removed_l1_fraction(d, prep, p)
                     for d, prep in zip(deltas, method.prepare(deltas, p, inputs), strict=True)]
            acc = removed.setdefault(name, [0.0] * len(deltas))
            for i, f in enumerate(fracs):
                acc[i] += (f or 0.0) * l1[i]
        if inputs.base_weight is not None:
            e = parallel_energy(deltas, inputs.base_weight)
            energies = e if energies is None else energies + e
    totals = [sum(float(ds[i].abs().sum()) for ds in deltas_by_module.values())
              for i in range(len(next(iter(deltas_by_module.values()))))]
    return InterferencePreview(
        cosine=cosine_matrix(deltas_by_module).tolist(),
        sign_conflict={m: c / e if e else 0.0 for m, (c, e) in conflicts.items()},
        sign_conflict_total=bad / eligible if eligible else 0.0,
        removed_mass={n: [m / t if t else 0.0 for m, t in zip(acc, totals, strict=True)]
                      for n, acc in removed.items()},
        parallel_fraction=None if energies is None else
        (energies[:, 0] / energies.sum(dim=1).clamp(min=1e-300)).tolist(),
    )
