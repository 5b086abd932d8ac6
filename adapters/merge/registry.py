"""The one registry of merge methods: name -> method instance (mergekit style)."""

from __future__ import annotations

from typing import Any

from adapters.merge.base import MergeMethod, MergeParameterError, MergeParams
from adapters.merge.dare import DareLinearMerge, DareTiesMerge
from adapters.merge.linear import LinearMerge
from adapters.merge.neuro import NeuroMerge
from adapters.merge.te import TeMerge
from adapters.merge.ties import TiesMerge
from adapters.merge.twin import TwinMerge


class UnknownMergeMethodError(MergeParameterError):
    """A merge method name that is not in `MERGE_METHODS`."""


MERGE_METHODS: dict[str, MergeMethod[Any, Any]] = {
    m.name: m
    for m in (LinearMerge(), TiesMerge(), DareLinearMerge(), DareTiesMerge(), NeuroMerge(),
              TeMerge(), TwinMerge())
}


def get_merge_method(name: str) -> MergeMethod[Any, Any]:
    """The registered method called `name`.

    Raises:
        UnknownMergeMethodError: listing the valid names.
    """
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(MERGE_METHODS))
        raise UnknownMergeMethodError(
            f"unknown merge method {name!r}; valid: {valid}", "method"
        ) from None


def make_params(name: str, **overrides: Any) -> MergeParams:
    """Validated parameters of method `name` (e.g. from a request's `merge` object)."""
    return get_merge_method(name).params(**overrides)
