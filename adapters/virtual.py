"""Virtual adapters: the result of a non-linear merge, materialised so it rides the batch path.

A request that asks for TIES, DARE, NeuroMerging, TE or Twin gets its selected adapters merged
on the true deltas `s_i * B_i @ A_i`, module by module, with the method's pure functions; the
result is stored as low-rank factors (exactly when the method gives factors or its result is
low-rank, or by a randomized rank-r SVD) or as a dense delta ("exact" storage of a full-rank
result), and the engine places it in a free slot. Per-adapter preparation (trim masks, DARE
masks, projections, TE relevance, Twin SVDs) is memoised per (method, parameters, adapter,
module); for methods linear in the weights once the set is fixed (TIES, DARE, DARE-TIES,
NeuroMerging: `MergeMethod.contributions`), the sign election is memoised per adapter set as
well, so that a new mix of a known set costs one weighted sum per module.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from adapters.merge import (
    MergeMethod,
    MergeParameterError,
    ModuleInputs,
    VirtualKey,
    compact_low_rank,
    get_merge_method,
    randomized_low_rank,
    tensor_nbytes,
)
from adapters.registry import LoraAdapter

Storage = Literal["svd", "exact"]
STORAGES: tuple[str, ...] = ("svd", "exact")
_ids = itertools.count(1)


@dataclass(frozen=True)
class VirtualModule:
    A: Tensor | None  # [r, in]; None when B holds a dense delta
    B: Tensor  # [out, r] (scaling folded in), or the dense delta [out, in]


@dataclass(frozen=True)
class VirtualAdapter:
    id: str
    modules: Mapping[str, VirtualModule]
    method: str
    relative_error: float  # ||merged - stored||_F / ||merged||_F over all modules; 0 if exact
    build_seconds: float

    def nbytes(self) -> int:
        return tensor_nbytes(self.modules)


@dataclass(frozen=True)
class SetContributions:
    """A method's per-set contributions `E [K, out, in]`, memoised: float32 (exact), or half.

    Half: `values = E / scale` in float16 with `scale = max|E|` per module, so entries sit in
    [-1, 1] where fp16 keeps 11 significant bits: each entry is off by at most 2^-11 of its own
    size (or 2^-24 * scale in the subnormal range); the weighted sum's relative Frobenius error
    stays below 1e-3 (tests/test_merge_speed.py; the bench prints the demo's). Half the bytes,
    but no longer exact, so it is opt-in (`DYNAMERGE_MERGE_HALF_SETS`).
    """

    values: Tensor  # [K, out, in] float32, or float16 scaled
    scale: float

    @staticmethod
    def pack(contributions: Tensor, half: bool = False) -> SetContributions:
        if not half:
            return SetContributions(contributions.float().contiguous(), 1.0)
        peak = float(contributions.abs().max()) if contributions.numel() else 0.0
        scale = peak if peak > 0 else 1.0
        return SetContributions((contributions / scale).to(torch.float16), scale)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """sum_k weights[k] * E[k] in float32: K fused passes, no [K, out, in] temporary."""
        w = [float(x) * self.scale for x in weights]
        out = self.values[0].mul(w[0]).float() if self.values.dtype == torch.float32 else (
            self.values[0].float().mul_(w[0]))  # never in place on the memo itself
        for k in range(1, len(w)):
            out.add_(self.values[k], alpha=w[k])
        return out

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass(frozen=True)
class MergeOptions:
    """The cache-key part of a merge besides ids and weights: method params and storage."""

    params: Any  # the method's frozen params dataclass
    storage: Storage
    rank: int


class MergeFactory:
    """Builds virtual adapters from the loaded adapters.

    Args:
        adapters: the live `{id: LoraAdapter}` of the engine (read at build time).
        base_weight: module name -> pre-trained weight [out, in] (NeuroMerging).
        task_inputs: (adapter ids, module) -> per adapter the module's inputs on that task's
            exemplars, [n_t, in] each (TE-Merging).
        prepared_budget_bytes: memory for memoised per-adapter preparations.
        half_sets: memoise per-set contributions in scaled float16 (`SetContributions`).
        set_budget_bytes: memory for memoised per-set contributions (default: as much as
            for the preparations), an LRU of its own.
    """

    def __init__(
        self,
        adapters: Mapping[str, LoraAdapter],
        base_weight: Callable[[str], Tensor],
        task_inputs: Callable[[Sequence[str], str], list[Tensor]],
        prepared_budget_bytes: int,
        half_sets: bool = False,
        set_budget_bytes: int | None = None,
    ) -> None:
        self.half_sets = half_sets
        self.adapters = adapters
        self.base_weight = base_weight
        self.task_inputs = task_inputs
        # two budgets: sets must not be evicted by the preparations they were built from
        self._prepared = _Lru(prepared_budget_bytes)
        self._sets = _Lru(prepared_budget_bytes if set_budget_bytes is None else set_budget_bytes)

    def build(self, key: VirtualKey, options: MergeOptions) -> VirtualAdapter:
        """Merge `key.adapter_ids` at `key.weights` (the rounded ones) with `key.method`."""
        started = time.perf_counter()
        method = get_merge_method(key.method)
        weights = torch.tensor(key.weights, dtype=torch.float32)
        modules: dict[str, VirtualModule] = {}
        error_sq = total_sq = 0.0
        linear = _linear_in_weights(method)
        for module in self._modules(key.adapter_ids):
            if linear:  # a new mix of a known set: one weighted sum, no election again
                merged = self.contributions(method, options.params, key.adapter_ids,
                                            module).weighted_sum(weights)
            else:
                prepared = self.prepared(method, options.params, key.adapter_ids, module)
                factors = method.combine_factors(prepared, weights, options.params)
                if factors is not None:  # exact low-rank result (Twin)
                    modules[module] = VirtualModule(A=factors[1], B=factors[0])
                    continue
                merged = method.combine(prepared, weights, options.params)
            if not bool(torch.isfinite(merged).all()):  # e.g. lambda_2 = 1e124 overflows fp32
                raise MergeParameterError(
                    f"{key.method}: the merged weights of {module} are not finite; its scale "
                    "parameters or weights are too large", param="method")
            bound = self._rank_bound(key.adapter_ids, module)
            stored, err_sq = _store(merged, options, method, bound)
            modules[module] = stored
            if options.storage != "exact":  # exact: nothing to relate (saves a full pass)
                error_sq += err_sq
                total_sq += float(merged.double().square().sum())
        return VirtualAdapter(
            id=f"merge-{key.method}-{next(_ids)}",
            modules=modules,
            method=key.method,
            relative_error=(error_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
            build_seconds=time.perf_counter() - started,
        )

    def prepared(
        self, method: MergeMethod, params: Any, adapter_ids: Sequence[str], module: str
    ) -> list[Any]:
        """Prepared entries for `adapter_ids` on `module`, memoised.

        Methods that look at the other adapters (`set_dependent`) are prepared over every
        loaded adapter at once; the others adapter by adapter.
        """
        if method.set_dependent:
            everyone = tuple(sorted(self.adapters))
            entries = self._memo((method.name, params, everyone, module),
                                 lambda: self._prepare(method, params, everyone, module))
            return [entries[everyone.index(a)] for a in adapter_ids]
        return [
            self._memo((method.name, params, (a,), module),
                       lambda a=a: self._prepare(method, params, (a,), module))[0]
            for a in adapter_ids
        ]

    def contributions(self, method: MergeMethod, params: Any, adapter_ids: Sequence[str],
                      module: str) -> SetContributions:
        """The method's per-set contributions for `adapter_ids` on `module`, memoised per
        (method, parameters, adapter set in this order, module)."""

        def make() -> list[Any]:
            prepared = self.prepared(method, params, adapter_ids, module)
            return [SetContributions.pack(method.contributions(prepared, params), self.half_sets)]

        key = (method.name, params, tuple(adapter_ids), module, "set", self.half_sets)
        return self._memo(key, make)[0]

    def _rank_bound(self, adapter_ids: Sequence[str], module: str) -> int:
        """Sum of the adapters' LoRA ranks on `module`: a bound on a low-rank result's rank."""
        mods = (self.adapters[a].modules.get(module) for a in adapter_ids)
        return max(1, sum(m.rank for m in mods if m is not None))

    def deltas(self, adapter_ids: Sequence[str], module: str) -> list[Tensor]:
        """True task vectors `s * B @ A` in float32; zeros for an adapter without the module."""
        out = []
        for adapter_id in adapter_ids:
            lora = self.adapters[adapter_id].modules.get(module)
            if lora is None:
                out.append(torch.zeros_like(self.base_weight(module), dtype=torch.float32))
            else:
                out.append(lora.delta())
        return out

    def _prepare(
        self, method: MergeMethod, params: Any, adapter_ids: Sequence[str], module: str
    ) -> list[Any]:
        needs = method.needs
        inputs = ModuleInputs(
            base_weight=self.base_weight(module).float() if "base_weight" in needs else None,
            task_inputs=self.task_inputs(adapter_ids, module) if "task_inputs" in needs else None,
            adapter_keys=[f"{a}/{module}" for a in adapter_ids],
        )
        return method.prepare(self.deltas(adapter_ids, module), params, inputs)

    def _memo(self, key: tuple, make: Callable[[], list[Any]]) -> list[Any]:
        memo = self._sets if "set" in key[4:] else self._prepared
        found = memo.get(key)
        if found is None:
            found = make()
            memo.put(key, found)
        return found

    def forget(self, adapter_id: str) -> None:
        """Drop memoised preparations involving `adapter_id` (it was removed or replaced)."""
        self._prepared.forget(adapter_id)
        self._sets.forget(adapter_id)

    def memo_bytes(self) -> tuple[int, int]:
        """Bytes held by (per-adapter preparations, per-set contributions)."""
        return self._prepared.bytes, self._sets.bytes

    def _modules(self, adapter_ids: Sequence[str]) -> list[str]:
        names: dict[str, None] = {}
        for adapter_id in adapter_ids:
            names.update(dict.fromkeys(self.adapters[adapter_id].modules))
        return list(names)


class _Lru:
    """Memoised values by key, least recently used out first once `budget` bytes are held;
    keys hold the adapter ids at index 2 (for `forget`). Thread-safe."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[list[Any], int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> list[Any] | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: tuple, value: list[Any]) -> None:
        size = tensor_nbytes(value)
        with self._lock:
            if size > self.budget or key in self._items:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if adapter_id in k[2]]:
                self.bytes -= self._items.pop(key)[1]


def _linear_in_weights(method: MergeMethod) -> bool:
    return type(method).contributions is not MergeMethod.contributions


def _store(merged: Tensor, options: MergeOptions, method: MergeMethod,
           rank_bound: int) -> tuple[VirtualModule, float]:
    """Store a merged delta, never through a full SVD.

    "exact": methods with a low-rank result (`low_rank_result`, TE) get compact factors from
    a randomized range finder at the adapters' summed rank, checked to 1e-5 relative; every
    other result (trim and drop masks make it full-rank) is kept dense: one extra
    [out, in] matmul in the forward for the rows that use it. "svd": randomized rank-`rank`
    factors (`torch.svd_lowrank`), near the optimal truncation.

    Returns:
        The stored module and its squared Frobenius error (0 when exact).
    """
    if options.storage == "exact":
        factors = compact_low_rank(merged, rank_bound) if method.low_rank_result else None
        if factors is not None:
            return VirtualModule(A=factors[1], B=factors[0]), 0.0
        return VirtualModule(A=None, B=merged), 0.0
    B, A = randomized_low_rank(merged, options.rank)
    return VirtualModule(A=A, B=B), float((merged - B @ A).double().square().sum())
