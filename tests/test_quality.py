"""The quality benchmark runs end to end on the micro zoo, and its table has every row."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from adapters.fingerprint import zoo_fingerprint
from app.engine.engine import Engine
from bench.quality import main
from bench.quality_lib import QualityTable, check_targets
from bench.quality_rows import DEFAULT_ROWS, expand_rows, request_for
from router_index.router import RoutingOptions

IDS = ["math", "cooking", "travel"]


def test_rows_expand_in_table_order() -> None:
    rows = expand_rows(list(DEFAULT_ROWS), IDS)
    assert [r.key for r in rows] == [
        "base", "ft:math", "ft:cooking", "ft:travel", "avg", "ta", "ties", "dare_ties", "neuro",
        "top1", "top2", "top3", "oracle",
    ]
    by_key = {r.key: r for r in rows}
    assert by_key["avg"].mix == tuple((a, 1 / 3) for a in IDS)
    assert by_key["ta"].mix == tuple((a, 0.3) for a in IDS)
    assert by_key["ties"].method == "ties" and by_key["ties"].mix == tuple((a, 1.0) for a in IDS)
    (explicit,) = expand_rows(["top2@0.005"], IDS)
    assert (explicit.top_k, explicit.temperature) == (2, 0.005)
    for bad in (["nope"], ["top0"], ["base", "base"], ["ft:unknown"]):
        with pytest.raises(ValueError):
            expand_rows(bad, IDS)


def test_requests_follow_the_row() -> None:
    defaults = RoutingOptions(temperature=0.01, threshold=0.3)
    top2, oracle, ties = expand_rows(["top2", "oracle", "ties"], IDS)
    request = request_for(top2, "math", "What is 2 plus 2?", "<chat>", defaults, 6)
    assert request.model == "auto" and request.mix is None
    assert (request.routing.top_k, request.routing.temperature) == (2, 0.01)
    assert request.routing.threshold == 0.3 and request.sampling.greedy
    assert request_for(oracle, "math", "p", "<chat>", defaults, 6).model == "math"
    static = request_for(ties, "math", "p", "<chat>", defaults, 6)
    assert static.merge.method == "ties" and static.routing is None


def test_targets_compare_dynamic_rows_with_experts_and_static_merges() -> None:
    rows = expand_rows(["ft", "avg", "top1"], ["a", "b"])
    table = QualityTable(["a", "b"], rows, {
        "ft:a": {"a": 1.0, "b": 0.0}, "ft:b": {"a": 0.0, "b": 0.8},
        "avg": {"a": 0.5, "b": 0.4}, "top1": {"a": 1.0, "b": 0.79},
    }, {"a": 10, "b": 10})
    expert, static = check_targets(table, None)
    assert not expert.met and "b at 98.8%" in expert.detail
    assert static.met and "+44.5 points" in static.detail


def test_benchmark_on_the_micro_zoo(micro_engine: Engine, tmp_path: Path) -> None:
    before = micro_engine.models()
    results, plot = tmp_path / "results.md", tmp_path / "quality.png"
    result = main(
        ["--zoo", "micro", "--limit", "2", "--ood-max-tokens", "4", "--ood-limit", "10",
         "--no-progress", "--results", str(results), "--plot", str(plot)],
        engine=micro_engine,
    )
    assert micro_engine.models() == before
    table = result.table
    assert set(table.tasks) == set(IDS)
    labels = [r.label for r in table.rows]
    assert len(labels) == 13 and not table.notes  # every row ran, none is n/a
    for row in table.rows:
        assert set(table.accuracy[row.key]) == set(IDS)
        assert not any(math.isnan(v) for v in table.accuracy[row.key].values())
    text = results.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Model |"))
    assert all(f"{t} (n=2)" in header for t in IDS) and header.endswith("| AVG | TIME (s) |")
    for label in labels:
        assert label in text
    assert "python -m bench.quality --zoo micro --limit 2" in text
    store = micro_engine.settings.adapter_store
    assert f"zoo fingerprint `{zoo_fingerprint(store)}`" in text  # the measured store's
    assert zoo_fingerprint(store) != zoo_fingerprint()  # not the demo zoo's
    assert plot.stat().st_size > 0
    routing = result.routing
    assert routing is not None and sum(map(sum, (r.values() for r in
                                                  routing.confusion.values()))) == 6
    ood = result.ood
    assert ood is not None and ood.n_prompts == 10
    same, fallbacks = ood.identical_on_fallback
    assert same == fallbacks  # a fallback answers exactly as the base model


def test_static_rows_accept_the_engines_rounded_weights() -> None:
    """A 1/6 mix is blended as 0.167 each at the default blend_weight_step (0.001): the same
    mix; another adapter, or a weight further than half a step, is not."""
    from bench.quality_lib import Answer, _check_blend
    from bench.quality_rows import Row

    ids = [f"t{i}" for i in range(6)]
    row = Row("avg", "Weight averaging", "static", mix=tuple((a, 1 / 6) for a in ids))

    def answer(blend: list[tuple[str, float]]) -> list[Answer]:
        return [Answer("x", tuple(blend), False, "linear")]

    _check_blend(row, answer([(a, 0.167) for a in ids]), 0.001)
    with pytest.raises(RuntimeError):
        _check_blend(row, answer([(a, 0.167) for a in ids]), 0.0)
    with pytest.raises(RuntimeError):
        _check_blend(row, answer([(a, 0.168) for a in ids]), 0.001)
    with pytest.raises(RuntimeError):
        _check_blend(row, answer([(a, 0.167) for a in [*ids[:5], "other"]]), 0.001)
