"""Merge methods as pure tensor functions on true task vectors, one registry, and helpers.

    method = get_merge_method("ties")
    params = method.params(density=0.3)
    prepared = method.prepare(deltas, params, inputs)     # at adapter load time
    merged = method.combine(prepared[:k], weights, params)  # per request, [out, in]
"""

from adapters.merge.base import MergeMethod, MergeParameterError, MergeParams, ModuleInputs
from adapters.merge.cache import CacheStats, VirtualAdapterCache, VirtualKey, tensor_nbytes
from adapters.merge.dare import DareParams, DareTiesParams
from adapters.merge.linear import LinearParams
from adapters.merge.neuro import NeuroParams, NeuroPrepared
from adapters.merge.registry import (
    MERGE_METHODS,
    UnknownMergeMethodError,
    get_merge_method,
    make_params,
)
from adapters.merge.svd import (
    compact_low_rank,
    exact_low_rank,
    randomized_low_rank,
    relative_error,
    truncated_svd,
)
from adapters.merge.te import TeParams, TePrepared
from adapters.merge.ties import TiesParams
from adapters.merge.twin import TwinParams, TwinPrepared

__all__ = [
    "MERGE_METHODS",
    "CacheStats",
    "DareParams",
    "DareTiesParams",
    "LinearParams",
    "MergeMethod",
    "MergeParameterError",
    "MergeParams",
    "ModuleInputs",
    "NeuroParams",
    "NeuroPrepared",
    "TeParams",
    "TePrepared",
    "TiesParams",
    "TwinParams",
    "TwinPrepared",
    "UnknownMergeMethodError",
    "VirtualAdapterCache",
    "VirtualKey",
    "compact_low_rank",
    "exact_low_rank",
    "get_merge_method",
    "make_params",
    "randomized_low_rank",
    "relative_error",
    "tensor_nbytes",
    "truncated_svd",
]
