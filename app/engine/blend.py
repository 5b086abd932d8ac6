"""From a routing decision (or a forced model) to the adapters and weights a request blends."""

from __future__ import annotations

from router_index.router import RouteDecision

BASE_MODEL = "base"
AUTO_MODEL = "auto"
Blend = tuple[tuple[str, float], ...]  # (adapter id, weight), weights as in Eq. 9


def blend_for(
    model: str, decision: RouteDecision | None, fallback_adapter: str | None = None
) -> Blend:
    """The (adapter, weight) pairs for a request.

    Args:
        model: "base" blends nothing; "auto" follows `decision`; any other value is one adapter
            id, used alone at weight 1.
        decision: the router's decision, required for "auto".
        fallback_adapter: used alone at weight 1 when routing falls back; None means base.
    """
    if model == BASE_MODEL:
        return ()
    if model != AUTO_MODEL:
        return ((model, 1.0),)
    if decision is None:
        raise ValueError("model 'auto' needs a routing decision")
    if decision.fallback:
        return () if fallback_adapter is None else ((fallback_adapter, 1.0),)
    return tuple((hit.adapter_id, hit.weight) for hit in decision.hits)
