"""Calibrating the fallback rules on cross-fitted in-domain queries against out-of-domain ones.

Three rules (router_index.router.should_fall_back):
- centroid: the best task's score (Eq. 5) under a threshold — what TR-Merging implies;
- nearest: the best task's nearest exemplar under a threshold. A paraphrase far from its
  task's centroid is often close to one exemplar, while an off-topic prompt is close to none;
- learned: logistic regression over (best score, margin to the second task, nearest exemplar),
  in-domain = route, out-of-domain = fall back; then the decision offset is moved, like a
  threshold, to the most OOD fallbacks that keep in-domain false fallbacks within the bound.

Every rule is placed by the same criterion, so they are compared on equal terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_L2 = 1e-2  # ridge on the standardized logistic weights: a few hundred points, three features
_NEWTON_STEPS = 25


@dataclass(frozen=True)
class FallbackRow:
    rule: str
    parameters: str  # the threshold, or the learned weights, as text
    fallback_rate: float  # in-domain queries that fall back (false fallbacks)
    routing_accuracy: float  # in-domain queries routed to their true task
    ood_fallback_rate: float  # out-of-domain queries that fall back (wanted)


def place_threshold(inside: np.ndarray, outside: np.ndarray, max_false_fallback: float) -> float:
    """The cut on a 1-D score (fall back below it) that drops the most `outside` values while
    at most `max_false_fallback` of `inside` fall below, in the middle of the gap between the
    two scores on either side of it (the widest margin).

    Args:
        inside: in-domain scores (higher = more in-domain).
        outside: out-of-domain scores.
        max_false_fallback: share of `inside` allowed below the cut, in [0, 1).
    """
    ordered = np.sort(inside)
    allowed = math.floor(max_false_fallback * len(ordered))
    upper = float(ordered[min(allowed, len(ordered) - 1)])  # a cut <= upper keeps the bound
    below = outside[outside < upper]
    if len(below) == 0:
        return upper - 0.05 * max(1.0, abs(upper))  # nothing to catch: keep a margin
    return float((below.max() + upper) / 2)


def fit_logistic(inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Weights (w_1..w_F, bias) of P(in-domain | features), by Newton's method with a small
    ridge, on standardized features, returned in the original units.

    Args:
        inside: [I, F] in-domain features.
        outside: [O, F] out-of-domain features.
    """
    x = np.concatenate([inside, outside]).astype(np.float64)
    y = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))])
    # Each class weighs the same, however many prompts each has.
    weight = np.where(y == 1, 0.5 / len(inside), 0.5 / max(len(outside), 1))
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    w = np.zeros(z.shape[1])
    ridge = _L2 * np.eye(z.shape[1])
    ridge[-1, -1] = 0.0  # no penalty on the bias
    for _ in range(_NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        gradient = z.T @ (weight * (p - y)) + ridge @ w
        hessian = (z * (weight * p * (1 - p))[:, None]).T @ z + ridge
        w -= np.linalg.solve(hessian, gradient)
    coefficients = w[:-1] / scale
    bias = w[-1] - float(coefficients @ mean)
    return np.concatenate([coefficients, [bias]])


def learned_rule(inside: np.ndarray, outside: np.ndarray,
                 max_false_fallback: float) -> tuple[float, float, float, float]:
    """The learned rule's weights: a logistic fit whose offset is then placed like a
    threshold (route iff w . f + bias >= 0)."""
    w = fit_logistic(inside, outside)
    logit_in, logit_out = inside @ w[:-1] + w[-1], outside @ w[:-1] + w[-1]
    cut = place_threshold(logit_in, logit_out, max_false_fallback)
    return (float(w[0]), float(w[1]), float(w[2]), float(w[3] - cut))


def rule_row(rule: str, parameters: str, fell_in: np.ndarray, correct: np.ndarray,
             fell_out: np.ndarray) -> FallbackRow:
    """The table row of one rule from its per-query outcomes."""
    return FallbackRow(
        rule=rule, parameters=parameters, fallback_rate=float(np.mean(fell_in)),
        routing_accuracy=float(np.mean(correct & ~fell_in)),
        ood_fallback_rate=float(np.mean(fell_out)) if len(fell_out) else math.nan,
    )
