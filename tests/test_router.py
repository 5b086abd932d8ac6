"""Routing maths (Eq. 5 identity, Eqs. 6-8 / 13, top-K, fallback) and routing on real prompts."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.errors import AdapterNotFoundError
from adapters.zoo.micro import topic_prompts
from router_index.index import TaskIndex
from router_index.router import RoutingOptions, decide, sharpen, softmax


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(4))
def test_centroid_scores_equal_brute_force_mean_cosine(seed):
    rng = np.random.default_rng(seed)
    dim = 32
    tasks = {f"t{i}": (tuple(f"x{i}{j}" for j in range(m)), _unit(rng, m, dim))
             for i, m in enumerate([5, 17, 50, 1])}
    index = TaskIndex.build(tasks)
    for query in _unit(rng, 10, dim):
        got = index.centroid_scores(query)
        for row, task in enumerate(index.task_ids):
            vectors = tasks[task][1]
            # Eq. 5 as written: the mean of cosines (norms recomputed, not assumed).
            cosines = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
            assert got[row] == pytest.approx(float(cosines.mean()), abs=1e-5)


def test_knn_scores_and_nearest():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 20, 16), _unit(rng, 20, 16)
    index = TaskIndex.build({"a": (tuple("a" * 20), a), "b": (tuple("b" * 20), b)})
    query = a[3]
    nearest = index.nearest(query, 4)
    assert nearest[0] == (3, pytest.approx(1.0, abs=1e-5))
    scores = index.knn_scores(query, 4)
    sims = np.concatenate([a, b]) @ query
    top = np.argsort(-sims)[:4]
    expected_a = sum(sims[j] for j in top if j < 20) / 4
    assert scores[0] == pytest.approx(expected_a, abs=1e-5)
    assert scores.sum() == pytest.approx(sims[top].sum() / 4, abs=1e-5)


@pytest.mark.parametrize("task_rows", [[0], [2, 0], [1, 2, 3]])
def test_nearest_of_tasks_equals_brute_force_over_those_tasks(task_rows):
    rng = np.random.default_rng(1)
    sizes = [5, 17, 50, 1]
    tasks = {f"t{i}": (tuple(f"x{i}{j}" for j in range(m)), _unit(rng, m, 16))
             for i, m in enumerate(sizes)}
    index = TaskIndex.build(tasks)
    query = _unit(rng, 1, 16)[0]
    got = index.nearest_of_tasks(query, task_rows, 6)
    owners = index.exemplar_task
    allowed = np.flatnonzero(np.isin(owners, task_rows))
    sims = index.embeddings @ query
    expected = allowed[np.argsort(-sims[allowed], kind="stable")][:6]
    assert [j for j, _ in got] == list(expected)
    assert all(owners[j] in task_rows for j, _ in got)
    assert [s for _, s in got] == pytest.approx([float(sims[j]) for j in expected], abs=1e-6)
    assert index.nearest_of_tasks(query, task_rows, 0) == []


def test_two_stage_and_single_stage_sharpening():
    s = np.array([0.6, 0.3, 0.1])
    alpha = np.exp(s) / np.exp(s).sum()  # Eq. 6
    two = np.exp(alpha / 0.05) / np.exp(alpha / 0.05).sum()  # Eqs. 7-8
    one = np.exp(s / 0.05) / np.exp(s / 0.05).sum()  # Eq. 13
    np.testing.assert_allclose(sharpen(s, 0.05, "two_stage"), two, rtol=1e-12)
    np.testing.assert_allclose(sharpen(s, 0.05, "single_stage"), one, rtol=1e-12)
    assert softmax(np.array([1000.0, 0.0]))[0] == pytest.approx(1.0)  # no overflow


def test_decide_top_k_renormalize_and_fallback():
    ids = ("a", "b", "c", "d")
    s = np.array([0.2, 0.7, 0.5, 0.4])
    hits, fallback = decide(ids, s, RoutingOptions(top_k=2, temperature=0.1,
                                                   sharpening="single_stage", threshold=0.1))
    assert not fallback and [h.adapter_id for h in hits] == ["b", "c"]
    full = sharpen(s, 0.1, "single_stage")
    assert [h.weight for h in hits] == pytest.approx([full[1], full[2]])  # not re-normalised
    assert sum(h.weight for h in hits) < 1
    hits, _ = decide(ids, s, RoutingOptions(top_k=2, temperature=0.1, renormalize=True,
                                            sharpening="single_stage", threshold=0.1))
    assert sum(h.weight for h in hits) == pytest.approx(1.0)
    hits, fallback = decide(ids, s, RoutingOptions(threshold=0.71))
    assert fallback and hits == ()


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"temperature": 0}, {"threshold": 1.5}])
def test_routing_options_validate(bad):
    with pytest.raises(ValueError):
        RoutingOptions(**bad)


def test_micro_zoo_prompts_route_to_their_topic(micro_engine):
    for topic in ("math", "cooking", "travel"):
        for prompt in topic_prompts(topic, 10, offset=1000):
            decision = micro_engine.route(prompt, micro_engine.router.options(threshold=-1.0))
            assert decision.hits[0].adapter_id == topic, prompt


def test_restricting_and_explaining(micro_engine):
    prompt = topic_prompts("math", 1, offset=1000)[0]
    decision = micro_engine.route(prompt, micro_engine.router.options(adapters=("travel",),
                                                                      threshold=-1.0))
    assert [h.adapter_id for h in decision.hits] == ["travel"]
    assert set(decision.scores) == {"travel"}
    # Explanations come from the best-scoring candidates' exemplars: here travel's only.
    assert decision.nearest and {e.adapter_id for e in decision.nearest} == {"travel"}
    free = micro_engine.route(prompt, micro_engine.router.options(threshold=-1.0))
    assert free.nearest[0].adapter_id == "math"
    with pytest.raises(AdapterNotFoundError):
        micro_engine.route(prompt, micro_engine.router.options(adapters=("nope",)))
    knn = micro_engine.route(prompt, micro_engine.router.options(scoring="knn", threshold=-1.0))
    assert knn.hits[0].adapter_id == "math"


def test_min_weight_drops_light_runners_up_but_never_the_best():
    from router_index.router import decide

    scores = np.array([0.9, 0.5, 0.49, 0.1])
    options = RoutingOptions(top_k=3, temperature=0.02, threshold=0.0, min_weight=0.05,
                             sharpening="single_stage")
    hits, fallback = decide(("a", "b", "c", "d"), scores, options)
    assert not fallback and [h.adapter_id for h in hits] == ["a"]
    everything = decide(("a", "b", "c", "d"), scores, RoutingOptions(
        top_k=3, temperature=0.5, threshold=0.0, min_weight=0.05, sharpening="single_stage"))[0]
    assert [h.adapter_id for h in everything] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="min_weight"):
        RoutingOptions(min_weight=1.0)
