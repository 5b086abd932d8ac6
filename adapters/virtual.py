"""Virtual adapters: the result of a non-linear merge, materialised so it rides the batch path.

A request that asks for TIES, DARE, NeuroMerging, TE or Twin gets its selected adapters merged
on the true deltas `s_i * B_i @ A_i`, module by module, with the method's pure functions; the
result is stored as low-rank factors (exactly when the method gives factors, or by truncated
SVD to a configured rank) or as a dense delta ("exact" storage), and the engine places it in a
free slot. Per-adapter preparation (trim masks, DARE masks, projections, TE relevance, Twin
SVDs) is memoised per (method, parameters, adapter set, module), so that a request whose merge
is not cached pays for the combination and the storage only.
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
    ModuleInputs,
    VirtualKey,
    exact_low_rank,
    get_merge_method,
    tensor_nbytes,
    truncated_svd,
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
    """

    def __init__(
        self,
        adapters: Mapping[str, LoraAdapter],
        base_weight: Callable[[str], Tensor],
        task_inputs: Callable[[Sequence[str], str], list[Tensor]],
        prepared_budget_bytes: int,
    ) -> None:
        self.adapters = adapters
        self.base_weight = base_weight
        self.task_inputs = task_inputs
        self.budget = prepared_budget_bytes
        self._prepared: OrderedDict[tuple, tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def build(self, key: VirtualKey, options: MergeOptions) -> VirtualAdapter:
        """Merge `key.adapter_ids` at `key.weights` (the rounded ones) with `key.method`."""
        started = time.perf_counter()
        method = get_merge_method(key.method)
        weights = torch.tensor(key.weights, dtype=torch.float32)
        modules: dict[str, VirtualModule] = {}
        error_sq = total_sq = 0.0
        for module in self._modules(key.adapter_ids):
            prepared = self.prepared(method, options.params, key.adapter_ids, module)
            factors = method.combine_factors(prepared, weights, options.params)
            if factors is not None:  # exact low-rank result (Twin)
                modules[module] = VirtualModule(A=factors[1], B=factors[0])
                continue
            merged = method.combine(prepared, weights, options.params)
            stored, err_sq = _store(merged, options)
            modules[module] = stored
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
        with self._lock:
            found = self._prepared.get(key)
            if found is not None:
                self._prepared.move_to_end(key)
                return found[0]
        value = make()
        size = tensor_nbytes(value)
        with self._lock:
            if size <= self.budget and key not in self._prepared:
                self._prepared[key] = (value, size)
                self._bytes += size
                while self._bytes > self.budget:
                    _, (_, dropped) = self._prepared.popitem(last=False)
                    self._bytes -= dropped
        return value

    def forget(self, adapter_id: str) -> None:
        """Drop memoised preparations involving `adapter_id` (it was removed or replaced)."""
        with self._lock:
            for key in [k for k in self._prepared if adapter_id in k[2]]:
                self._bytes -= self._prepared.pop(key)[1]

    def _modules(self, adapter_ids: Sequence[str]) -> list[str]:
        names: dict[str, None] = {}
        for adapter_id in adapter_ids:
            names.update(dict.fromkeys(self.adapters[adapter_id].modules))
        return list(names)


def _store(merged: Tensor, options: MergeOptions) -> tuple[VirtualModule, float]:
    """Store a merged delta: "exact" keeps it exactly (compact factors when its numerical rank
    is low, e.g. TE's row-masked sums; dense otherwise); "svd" truncates to `rank`.

    Returns:
        The stored module and its squared Frobenius error.
    """
    if options.storage == "exact":
        B, A = exact_low_rank(merged)
        if A.shape[0] * sum(merged.shape) < merged.numel():
            return VirtualModule(A=A, B=B), 0.0
        return VirtualModule(A=None, B=merged), 0.0
    B, A = truncated_svd(merged, options.rank)
    return VirtualModule(A=A, B=B), float((merged - B @ A).double().square().sum())
