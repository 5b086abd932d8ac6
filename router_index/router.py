"""Training-free routing (TR-Merging): scores -> sharpened weights -> top-K -> RouteDecision."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from adapters.errors import AdapterNotFoundError
from router_index.embedder import Embedder
from router_index.embedding_cache import EmbeddingCache
from router_index.index import TaskIndex

Scoring = Literal["centroid", "knn"]
Sharpening = Literal["two_stage", "single_stage"]
# When to fall back to the base model (see `should_fall_back`).
Fallback = Literal["centroid", "nearest", "learned"]
FALLBACK_RULES: tuple[str, ...] = ("centroid", "nearest", "learned")
MIN_TEMPERATURE = 1e-6


class RoutingOptionError(ValueError):
    """A routing option out of range; `param` names it as a request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RoutingOptions:
    top_k: int = 3
    temperature: float = 0.02  # tau of Eqs. 7-8 (or 13)
    threshold: float = 0.25  # a cosine: the centroid or nearest rule falls back below it
    fallback: Fallback = "centroid"  # which rule decides a fallback
    # The learned rule's (w_score, w_margin, w_nearest, bias): route iff w . f + bias >= 0.
    fallback_weights: tuple[float, float, float, float] | None = None
    scoring: Scoring = "centroid"
    sharpening: Sharpening = "two_stage"
    renormalize: bool = False  # re-normalise the K kept weights to sum to 1
    # Drop hits (after the best) whose weight is below this: with a calibrated temperature the
    # runners-up of a large store weigh ~1e-6, and each still needs a device slot. 0: Eq. 9.
    min_weight: float = 0.0
    knn_m: int = 10  # exemplars considered by the knn scoring mode
    adapters: tuple[str, ...] | None = None  # restrict routing to these ids
    explain: int = 5  # nearest exemplars of the top_k best-scoring tasks, reported with it

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise RoutingOptionError("routing.top_k must be >= 1", "routing.top_k")
        # alpha / tau must stay finite: with alpha <= 1, tau >= 1e-6 keeps it under 1e6.
        if not (self.temperature >= MIN_TEMPERATURE and math.isfinite(self.temperature)):
            raise RoutingOptionError(f"routing.temperature must be >= {MIN_TEMPERATURE:g}",
                                     "routing.temperature")
        if not -1.0 <= self.threshold <= 1.0:
            raise RoutingOptionError("routing.threshold must be a cosine in [-1, 1]",
                                     "routing.threshold")
        if self.knn_m < 1:
            raise RoutingOptionError("routing.knn_m must be >= 1", "routing.knn_m")
        if self.scoring not in ("centroid", "knn"):
            raise RoutingOptionError("routing.scoring must be 'centroid' or 'knn'",
                                     "routing.scoring")
        if not 0.0 <= self.min_weight < 1.0:
            raise RoutingOptionError("routing.min_weight must be in [0, 1)", "routing.min_weight")
        if self.fallback not in FALLBACK_RULES:
            raise RoutingOptionError(f"routing.fallback must be one of {', '.join(FALLBACK_RULES)}",
                                     "routing.fallback")
        if self.fallback == "learned" and (
            self.fallback_weights is None or len(self.fallback_weights) != 4
            or not all(math.isfinite(w) for w in self.fallback_weights)
        ):
            raise RoutingOptionError("the learned fallback rule needs four finite weights "
                                     "(from a calibration)", "routing.fallback")
        if self.sharpening not in ("two_stage", "single_stage"):
            raise RoutingOptionError("routing.sharpening must be 'two_stage' or 'single_stage'",
                                     "routing.sharpening")


@dataclass(frozen=True)
class RouteHit:
    adapter_id: str
    score: float  # Eq. 5: mean cosine to the task's exemplars, in [-1, 1]
    weight: float  # alpha_hat (Eq. 8 or 13); over all hits the weights sum to at most 1


@dataclass(frozen=True)
class Exemplar:
    adapter_id: str
    text: str
    score: float  # cosine to the query


@dataclass(frozen=True)
class RouteDecision:
    hits: tuple[RouteHit, ...]  # the adapters blended, best first; empty on fallback
    scores: dict[str, float]  # every candidate task's score
    fallback: bool  # best score below threshold: answer with the fallback (base by default)
    nearest: tuple[Exemplar, ...]
    latency_s: float = 0.0  # embedding + search

    @property
    def top_score(self) -> float:
        return max(self.scores.values(), default=float("nan"))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sharpen(scores: np.ndarray, temperature: float, sharpening: Sharpening) -> np.ndarray:
    """alpha_hat from the scores.

    two_stage (Eqs. 6-8): alpha = softmax(s), alpha_hat = softmax(alpha / tau).
    single_stage (Eq. 13): alpha_hat = softmax(s / tau).
    """
    if sharpening == "two_stage":
        return softmax(softmax(scores) / temperature)
    return softmax(scores / temperature)


def fallback_features(scores: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """What the fallback rules look at, per query: the best task's score (Eq. 5), its margin
    over the second best, and the cosine of the nearest exemplar of the best task.

    Args:
        scores: [Q, N] task scores.
        nearest: [Q] nearest-exemplar cosine of each query's best task.

    Returns:
        [Q, 3] float64.
    """
    ordered = np.sort(scores, axis=1)
    best = ordered[:, -1]
    second = ordered[:, -2] if scores.shape[1] > 1 else np.full_like(best, -1.0)
    return np.stack([best, best - second, nearest], axis=1).astype(np.float64)


def should_fall_back(features: np.ndarray, options: RoutingOptions) -> np.ndarray:
    """[Q] bool: each query's fallback under `options` (features from `fallback_features`).

    - centroid: the best task's mean cosine (Eq. 5) is below `threshold`;
    - nearest: the best task's nearest exemplar is below `threshold`, a rule that forgives
      in-domain phrasings far from a task's centroid but close to one of its exemplars;
    - learned: a logistic rule over all three features, fitted by calibration on
      cross-fitted exemplars against out-of-domain prompts.
    """
    if options.fallback == "nearest":
        return features[:, 2] < options.threshold
    if options.fallback == "learned":
        assert options.fallback_weights is not None
        w = np.asarray(options.fallback_weights, dtype=np.float64)
        return features @ w[:3] + w[3] < 0.0
    return features[:, 0] < options.threshold


def decide(
    task_ids: tuple[str, ...], scores: np.ndarray, options: RoutingOptions,
    nearest: float = 1.0,
) -> tuple[tuple[RouteHit, ...], bool]:
    """Top-K hits and the fallback flag from scores over `task_ids` (already restricted).

    Args:
        task_ids: the candidate tasks.
        scores: [N] their scores.
        options: routing options.
        nearest: cosine of the nearest exemplar of the best task (the nearest and learned
            fallback rules read it).
    """
    if len(task_ids) == 0:
        return (), True
    features = fallback_features(scores[None, :].astype(np.float64), np.array([nearest]))
    if bool(should_fall_back(features, options)[0]):
        return (), True
    weights = sharpen(scores.astype(np.float64), options.temperature, options.sharpening)
    top = np.argsort(-weights, kind="stable")[: options.top_k]
    top = top[(weights[top] >= options.min_weight) | (np.arange(len(top)) == 0)]
    kept = weights[top]
    if options.renormalize:
        kept = kept / kept.sum()
    hits = tuple(
        RouteHit(task_ids[i], float(scores[i]), float(w)) for i, w in zip(top, kept, strict=True)
    )
    return hits, False


class Router:
    """Embeds a request and routes it over the current `TaskIndex` snapshot."""

    def __init__(
        self,
        embedder: Embedder,
        defaults: RoutingOptions | None = None,
        cache: EmbeddingCache | None = None,
        approximate_above: int | None = None,
    ) -> None:
        """Args:
            embedder: the sentence embedder.
            defaults: routing options when a request gives none.
            cache: exemplar embeddings on disk; None embeds everything at every start.
            approximate_above: exemplar count above which kNN search is approximate (IVF);
                None: always exact.
        """
        self.embedder = embedder
        self.defaults = defaults or RoutingOptions()
        self.cache = cache
        self.approximate_above = approximate_above
        self.index = TaskIndex.build({})
        self._write_lock = threading.Lock()

    def build(self, tasks: dict[str, tuple[str, ...]], show_progress: bool = True) -> None:
        """Embed every task's exemplars (or read them from the cache) and index them."""
        embedded = {}
        for task, texts in tqdm(
            tasks.items(), desc="Indexing exemplars", unit="task", disable=not show_progress
        ):
            embedded[task] = (texts, self._embed(texts))
        self.index = TaskIndex.build(embedded, approximate_above=self.approximate_above)

    def add_task(self, task: str, texts: tuple[str, ...]) -> None:
        vectors = self._embed(texts)
        with self._write_lock:
            self.index = self.index.with_task(task, texts, vectors)

    def _embed(self, texts: tuple[str, ...]) -> np.ndarray:
        if self.cache is None:
            return self.embedder.encode(list(texts))
        return self.cache.get_or_embed(texts, self.embedder.encode)

    def remove_task(self, task: str) -> None:
        with self._write_lock:
            if task in self.index.task_ids:
                self.index = self.index.without_task(task)

    def route(self, text: str, options: RoutingOptions | None = None) -> RouteDecision:
        options = options or self.defaults
        started = time.perf_counter()
        index = self.index  # one snapshot for the whole decision
        query = self.embedder.encode([text])[0]
        if options.scoring == "knn":
            all_scores = index.knn_scores(query, options.knn_m)
        else:
            all_scores = index.centroid_scores(query)
        candidates = list(range(len(index.task_ids)))
        if options.adapters is not None:
            unknown = [a for a in options.adapters if a not in index.task_ids]
            if unknown:
                raise AdapterNotFoundError(f"routing.adapters names unknown adapters: {unknown}",
                                           param="routing.adapters")
            candidates = [index.task_ids.index(a) for a in dict.fromkeys(options.adapters)]
        task_ids = tuple(index.task_ids[i] for i in candidates)
        scores = all_scores[candidates]
        # Explain with the exemplars of the best-scoring candidates only: exact for them, and
        # no search over every exemplar of a large index on each request.
        best = [candidates[i] for i in np.argsort(-scores, kind="stable")[: options.top_k]]
        closest = index.nearest_of_tasks(query, best[:1], 1)
        hits, fallback = decide(task_ids, scores, options,
                                nearest=closest[0][1] if closest else -1.0)
        nearest = tuple(
            Exemplar(index.task_ids[index.exemplar_task[j]], index.exemplar_texts[j], sim)
            for j, sim in index.nearest_of_tasks(query, best, options.explain)
        )
        return RouteDecision(
            hits=hits,
            scores={t: float(s) for t, s in zip(task_ids, scores, strict=True)},
            fallback=fallback,
            nearest=nearest,
            latency_s=time.perf_counter() - started,
        )

    def options(self, **overrides: object) -> RoutingOptions:
        """The defaults with the given non-None overrides applied (validated). A threshold
        given alone is a cosine for the centroid rule, whatever rule the defaults use."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "threshold" in given and "fallback" not in given:
            given["fallback"] = "centroid"
        return replace(self.defaults, **given)
