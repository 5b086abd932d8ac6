"""`dare_linear` and `dare_ties`: DARE (drop with probability p, rescale by 1/(1-p)).

Masks are drawn once, at preparation, from a generator seeded per adapter, so one adapter's
mask repeats across restarts and does not depend on which other adapters are loaded.
"""

from __future__ import annotations

import hashlib
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
    check_int,
    check_number,
    weight_tensor,
)
from adapters.merge.ops import elect_and_mean, elected_contributions, l1_removed, weighted_sum


@dataclass(frozen=True)
class DareParams(MergeParams):
    drop_rate: float = 0.5
    """Probability p of dropping an entry, in [0, 1). The DARE paper goes to 0.9 on full
    fine-tunes; LoRA deltas are denser in signal, so the default is the milder 0.5."""
    seed: int = 0
    """Base seed; each adapter's generator is seeded from (seed, adapter key)."""

    def __post_init__(self) -> None:
        check_number("drop_rate", self.drop_rate, lo=0.0, hi=1.0, hi_open=True)
        check_int("seed", self.seed, lo=0)


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    majority_sign_method: str = "total"
    """"total": sign of the sum; "frequency": sign of the count of signs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("majority_sign_method", self.majority_sign_method, MAJORITY_SIGN_METHODS)


def adapter_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed from (base seed, adapter key); Python's `hash` is salted per run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def dare_drop(delta: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Drop entries with probability `drop_rate`, rescale survivors by 1/(1 - drop_rate).

    Semantics (PEFT `random_pruning(..., rescale=True)` with density = 1 - p):
        keep ~ Bernoulli(1 - p)            [out, in], drawn from the CPU `generator`
        out  = delta * keep / (1 - p)      so E[out] = delta

    The rescale is what LoRAX lost (its `torch.div` result was thrown away); without it
    every merged entry shrinks by (1 - p) in expectation.
    """
    if drop_rate == 0:
        return delta  # PEFT draws nothing at density 1 either
    keep_prob = 1.0 - drop_rate
    # drawn on the CPU generator whatever the delta's device: CUDA streams differ from CPU
    # ones, and a mask must not change when the server moves from a laptop to a GPU box
    probs = torch.full(delta.shape, keep_prob, dtype=delta.dtype)
    keep = torch.bernoulli(probs, generator=generator).to(delta.device)
    return delta * keep / keep_prob


def _drop_all(deltas: Sequence[Tensor], params: DareParams,
              inputs: ModuleInputs | None, method: str) -> list[Tensor]:
    """Each delta dropped with its own generator.

    With `inputs.adapter_keys`, adapter i's generator is seeded with
    `adapter_seed(seed, key_i)`: independent of load order and of the other adapters (what
    the engine must use). Without keys, one generator seeded with `seed` draws the masks in
    order, which reproduces PEFT's `torch.manual_seed(seed); dare_*(...)` exactly.
    """
    check_deltas(deltas, method)
    keys = inputs.adapter_keys if inputs is not None else None
    if keys is None:
        gen = torch.Generator().manual_seed(params.seed)
        return [dare_drop(d, params.drop_rate, gen) for d in deltas]
    if len(keys) != len(deltas):
        raise ValueError(f"{method}: {len(keys)} adapter_keys for {len(deltas)} deltas")
    return [
        dare_drop(d, params.drop_rate, torch.Generator().manual_seed(adapter_seed(params.seed, k)))
        for d, k in zip(deltas, keys, strict=True)
    ]


class DareLinearMerge(MergeMethod[DareParams, Tensor]):
    """Semantics (equal to `peft.utils.merge_utils.dare_linear` given the same masks):
        prepare:  d_i = dare_drop(delta_i, p)            [out, in]
        combine:  merged = sum_i w_i d_i

    One adapter at weight 1 gives the adapter back only at p = 0 (else in expectation).
    """

    name = "dare_linear"
    params_type = DareParams
    exact_single = False
    prunes = True

    def prepare(self, deltas: Sequence[Tensor], params: DareParams,
                inputs: ModuleInputs | None = None) -> list[Tensor]:
        return _drop_all(deltas, params, inputs, self.name)

    def combine(self, prepared: Sequence[Tensor], weights: Tensor | Sequence[float],
                params: DareParams) -> Tensor:
        check_deltas(prepared, self.name)
        w = weight_tensor(weights, len(prepared), prepared[0], self.name)
        return weighted_sum(torch.stack(list(prepared)), w)

    def contributions(self, prepared: Sequence[Tensor], params: DareParams) -> Tensor:
        check_deltas(prepared, self.name)
        return torch.stack(list(prepared))

    def removed_l1_fraction(self, delta: Tensor, prepared: Tensor, params: DareParams) -> float:
        # undo the rescale: the removed mass is that of the dropped entries
        return l1_removed(delta, prepared * (1.0 - params.drop_rate))


class DareTiesMerge(DareLinearMerge):
    """Semantics (equal to `peft.utils.merge_utils.dare_ties` given the same masks):
        prepare:  d_i = dare_drop(delta_i, p)
        combine:  elect sign on the unweighted d_i, disjoint mean of w_i d_i (as `ties`)
    """

    name = "dare_ties"
    params_type = DareTiesParams

    def combine(self, prepared: Sequence[Tensor], weights: Tensor | Sequence[float],
                params: DareTiesParams) -> Tensor:  # type: ignore[override]
        check_deltas(prepared, self.name)
        w = weight_tensor(weights, len(prepared), prepared[0], self.name)
        return elect_and_mean(torch.stack(list(prepared)), w, params.majority_sign_method)

    def contributions(self, prepared: Sequence[Tensor],
                      params: DareTiesParams) -> Tensor:  # type: ignore[override]
        check_deltas(prepared, self.name)
        return elected_contributions(torch.stack(list(prepared)), params.majority_sign_method)
