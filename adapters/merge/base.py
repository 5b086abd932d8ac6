"""The contract every merge method follows: validated parameters, prepare once, combine per request.

A merge method works on the true task vectors of one module, `delta_i = s_i * B_i @ A_i`
(`[out, in]`), never on the LoRA factors separately. It is split in two:

- `prepare(deltas, params, inputs)`: everything that depends on the adapters alone (trim
  masks, DARE drop masks, NeuroMerging projections, TE relevance masks, Twin SVDs). The
  engine runs it once per (method, parameters, adapter, module), the first time a request
  needs it, and memoises it (adapters.virtual.MergeFactory): never again per request.
- `combine(prepared, weights, params)`: the per-request part, a pure function of the
  prepared tensors and the request's weights (one weight per selected adapter).

`MergeMethod.merge` chains both for one-off use (static exports, tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

MAJORITY_SIGN_METHODS = ("total", "frequency")


class MergeParameterError(ValueError):
    """A merge method's parameter is unknown or out of range; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_number(name: str, value: object, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise MergeParameterError naming `name` unless `value` is a finite number within bounds.

    Args:
        name: the parameter's name, quoted in the error.
        value: the value to check (bools are rejected: `True` is not a density).
        lo, hi: bounds, or None for unbounded.
        lo_open, hi_open: whether the bound itself is excluded.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergeParameterError(f"{name} must be a finite number, got {value!r}", name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise MergeParameterError(f"{name} must be in {span}, got {value!r}", name)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise MergeParameterError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise MergeParameterError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}", name)


def check_int(name: str, value: object, *, lo: int) -> None:
    """Raise MergeParameterError naming `name` unless `value` is an int >= `lo`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MergeParameterError(f"{name} must be an integer >= {lo}, got {value!r}", name)


@dataclass(frozen=True)
class MergeParams:
    """Base of every method's parameters: frozen, hashable (part of the cache key), validated.

    Subclasses validate in `__post_init__` and raise ValueError naming the parameter.
    """


@dataclass(frozen=True)
class ModuleInputs:
    """What a preparation may need beyond the deltas, for one module.

    `adapter_keys`, `task_inputs` are aligned with the `deltas` passed to `prepare`.
    """

    base_weight: Tensor | None = None
    """Pre-trained weight `W` of the module, [out, in] (neuro)."""
    task_inputs: Sequence[Tensor] | None = None
    """Per adapter, the module's inputs `X_t` on that task's exemplars, [n_t, in] (te)."""
    adapter_keys: Sequence[str] | None = None
    """Stable names that seed per-adapter randomness (dare), e.g. "adapter_id/module"."""


P = TypeVar("P", bound=MergeParams)
Prep = TypeVar("Prep")


class MergeMethod(ABC, Generic[P, Prep]):
    """One merge method: a parameter type, a preparation and a per-request combination."""

    name: ClassVar[str]
    params_type: ClassVar[type[MergeParams]]
    needs: ClassVar[frozenset[str]] = frozenset()
    """Fields of `ModuleInputs` that `prepare` requires ("base_weight", "task_inputs")."""
    set_dependent: ClassVar[bool] = False
    """True when one adapter's preparation looks at the other adapters (te, twin): adding or
    removing an adapter means preparing the whole set again."""
    exact_single: ClassVar[bool] = True
    """One adapter at weight 1 gives that adapter's delta back, at default parameters."""
    prunes: ClassVar[bool] = False
    """Preparation removes part of each delta (`removed_l1_fraction` says how much)."""
    low_rank_result: ClassVar[bool] = False
    """The merged delta's rank is at most the sum of the adapters' LoRA ranks (te: row-masked
    sums of LoRA deltas), so exact storage finds compact factors; otherwise the result is
    full-rank (trim and drop masks) and exact storage keeps it dense, with no SVD tried."""

    def params(self, **overrides: Any) -> P:
        """Build validated parameters from defaults and overrides (e.g. a request's `merge`).

        Raises:
            MergeParameterError: on an unknown parameter name (listing the valid ones) or a
                bad value.
        """
        valid = [f.name for f in dataclasses.fields(self.params_type)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise MergeParameterError(
                f"unknown parameter {', '.join(map(repr, unknown))} for merge method "
                f"{self.name!r}; valid: {', '.join(valid) or '(none)'}", unknown[0]
            )
        return self.params_type(**overrides)  # type: ignore[return-value]

    @abstractmethod
    def prepare(self, deltas: Sequence[Tensor], params: P,
                inputs: ModuleInputs | None = None) -> list[Prep]:
        """Per-adapter work, done once at load time.

        Args:
            deltas: task vectors of one module, each [out, in], one per adapter.
            params: this method's parameters.
            inputs: extra tensors named in `needs`, aligned with `deltas`.

        Returns:
            One prepared entry per delta, in order.
        """

    @abstractmethod
    def combine(self, prepared: Sequence[Prep], weights: Tensor | Sequence[float],
                params: P) -> Tensor:
        """Per-request merge of the selected adapters' prepared entries.

        Args:
            prepared: entries from `prepare`, one per selected adapter.
            weights: [K] request weights aligned with `prepared`.
            params: the parameters `prepared` was built with.

        Returns:
            The merged delta, [out, in].
        """

    def combine_factors(self, prepared: Sequence[Prep], weights: Tensor | Sequence[float],
                        params: P) -> tuple[Tensor, Tensor] | None:
        """The merged delta as low-rank factors `(B [out, r], A [r, in])`, when the method
        can give it without a dense intermediate; None otherwise (then use `combine`)."""
        return None

    def contributions(self, prepared: Sequence[Prep], params: P) -> Tensor | None:
        """The per-set, weight-independent part of the merge, when the method is linear in the
        request's weights once its adapter set is fixed; None otherwise.

        Semantics (what `combine` must equal, for every weight vector w):
            E = contributions(prepared, params)            [K, out, in]
            combine(prepared, w, params) == sum_k w[k] * E[k]

        TIES-style methods elect signs on the UNweighted task vectors and divide by a count,
        not a weight sum (PEFT semantics), so the election, its masks and its divisor depend on
        the adapter set alone: a new mix of the same adapters then costs one weighted sum.
        """
        return None

    def removed_l1_fraction(self, delta: Tensor, prepared: Prep, params: P) -> float | None:
        """Fraction of `delta`'s L1 mass that preparation removed; None if it prunes nothing."""
        return None

    def merge(self, deltas: Sequence[Tensor], weights: Tensor | Sequence[float],
              params: P | None = None, inputs: ModuleInputs | None = None) -> Tensor:
        """`combine(prepare(deltas), weights)`: one-off merge (static exports, tests)."""
        params = params if params is not None else self.params()
        return self.combine(self.prepare(deltas, params, inputs), weights, params)


def check_deltas(deltas: Sequence[Tensor], method: str) -> torch.Size:
    """Check that there is at least one delta and that all are 2-D with one shape.

    Returns:
        The common shape [out, in].
    """
    if len(deltas) == 0:
        raise ValueError(f"{method}: at least one delta is needed")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.dim() != 2 or d.shape != shape:
            raise ValueError(
                f"{method}: delta {i} has shape {tuple(d.shape)}, expected a 2-D "
                f"{tuple(shape)} like delta 0"
            )
    return shape


def weight_tensor(weights: Tensor | Sequence[float], n: int, like: Tensor, method: str) -> Tensor:
    """The request's weights as a finite [n] tensor with `like`'s dtype and device."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"{method}: got {w.numel()} weights for {n} adapters")
    if not torch.isfinite(w).all():
        raise ValueError(f"{method}: weights must be finite, got {w.tolist()}")
    return w


def inputs_for(inputs: ModuleInputs | None, field: str, n: int, method: str) -> Any:
    """Fetch a required `ModuleInputs` field, checking it is present (and aligned if a list)."""
    value = getattr(inputs, field) if inputs is not None else None
    if value is None:
        raise ValueError(f"{method}: prepare needs inputs.{field}")
    if field != "base_weight" and len(value) != n:
        raise ValueError(f"{method}: inputs.{field} has {len(value)} entries for {n} deltas")
    return value
