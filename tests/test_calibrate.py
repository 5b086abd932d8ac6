"""`dynamerge calibrate`: held-out choice of temperature and threshold, and the server using it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from server import LiveServer

from adapters.zoo.micro import MicroZoo, topic_prompts
from app.cli import main as cli_main
from app.engine.engine import Engine
from app.main import create_app
from app.settings import Settings
from router_index.calibrate import (
    OOD_PROMPTS,
    HeldOutScores,
    TemperatureRow,
    calibrate,
    choose_temperature,
    held_out_scores,
    load_calibration,
    read_prompts,
    threshold_row,
    write_calibration,
)
from router_index.fallback import place_threshold
from router_index.router import RoutingOptions, fallback_features, sharpen, should_fall_back


def _held(inside: list[float], ood: list[float]) -> HeldOutScores:
    """Two tasks; every in-domain query belongs to task 0 and has the given top score."""
    scores = np.array([[s, s - 0.2] for s in inside])
    return HeldOutScores(("a", "b"), scores, np.zeros(len(inside), dtype=np.int64),
                         np.array([[s, s - 0.1] for s in ood]))


def _cut(held: HeldOutScores, max_false_fallback: float) -> float:
    return place_threshold(held.scores.max(axis=1), held.ood_scores.max(axis=1),
                           max_false_fallback)


def test_threshold_sits_in_the_middle_of_the_gap() -> None:
    held = _held([0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3])
    threshold = _cut(held, max_false_fallback=0.0)
    assert threshold == pytest.approx(0.4)
    row = threshold_row(held, threshold)
    assert (row.fallback_rate, row.routing_accuracy, row.ood_fallback_rate) == (0.0, 1.0, 1.0)


def test_threshold_never_drops_more_in_domain_prompts_than_allowed() -> None:
    held = _held([0.25, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.55])
    strict = _cut(held, max_false_fallback=0.0)
    assert strict == pytest.approx(0.225)  # below 0.25: between the OOD 0.2 and it
    assert threshold_row(held, strict).fallback_rate == 0.0
    loose = _cut(held, max_false_fallback=0.25)  # one of four may fall back
    assert loose == pytest.approx(0.575)
    row = threshold_row(held, loose)
    assert row.fallback_rate == 0.25 and row.ood_fallback_rate == 1.0


def test_temperature_is_the_lowest_nll_and_ties_go_softer() -> None:
    rows = [TemperatureRow(0.01, 1.0, 0.99, 0.0100), TemperatureRow(0.02, 1.0, 0.98, 0.0105),
            TemperatureRow(0.05, 1.0, 0.80, 0.2)]
    assert choose_temperature(rows) == 0.02


def test_held_out_scores_never_score_a_query_against_itself() -> None:
    rng = np.random.default_rng(0)
    tasks = {}
    for name in ("a", "b"):
        v = rng.normal(size=(8, 16))
        tasks[name] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    held = held_out_scores(tasks, tasks["a"][:1], folds=4)
    # Query 0 of task a sits in fold 0: its score is the mean cosine to the other folds only.
    others = tasks["a"][np.arange(8) % 4 != 0]
    assert held.scores[0, 0] == pytest.approx(float(np.mean(others @ tasks["a"][0])), abs=1e-5)
    assert held.scores.shape == (16, 2) and held.ood_scores.shape == (4, 2)
    assert list(held.truth) == [0, 0, 1, 1] * 4  # per fold: task a's queries, then task b's


def test_calibrate_writes_a_file_that_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centers = np.eye(3, 16, dtype=np.float32)
    tasks = {}
    for i, name in enumerate(("a", "b", "c")):
        v = centers[i] + 0.3 * rng.normal(size=(12, 16))
        tasks[name] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    ood = rng.normal(size=(10, 16))
    ood = (ood / np.linalg.norm(ood, axis=1, keepdims=True)).astype(np.float32)
    calibration = calibrate(tasks, ood, folds=3, top_k=2)
    path = tmp_path / "calibration.json"
    write_calibration(calibration, path)
    raw = json.loads(path.read_text())
    for key in ("temperature", "threshold", "top_k", "sharpening", "chosen_at",
                "routing_accuracy", "fallback_rate"):
        assert key in raw
    assert raw["fallback_rate"] == 0.0 and raw["top_k"] == 2
    assert load_calibration(path) == calibration
    path.write_text(json.dumps({**raw, "temperature": -1}))
    with pytest.raises(ValueError, match="temperature"):
        load_calibration(path)


def test_packaged_ood_prompts() -> None:
    prompts = read_prompts(OOD_PROMPTS)
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)


# --- the server uses what `dynamerge calibrate` wrote -------------------------------------
@pytest.fixture(scope="module")
def calibration_file(micro_zoo: MicroZoo, tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch_module: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    monkeypatch_module.setenv("DYNAMERGE_ADAPTER_STORE", str(micro_zoo.store_dir))
    assert cli_main(["calibrate", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def calibrated_http(calibration_file: Path, micro_settings: Settings) -> Iterator[httpx.Client]:
    settings = micro_settings.model_copy(update={"calibration_file": calibration_file})
    engine = Engine(settings)
    engine.load(show_progress=False)
    try:
        with LiveServer(create_app(settings, engine)) as live, live.client() as client:
            yield client
    finally:
        engine.shutdown()


def test_server_routes_with_the_calibrated_values(
    calibration_file: Path, calibrated_http: httpx.Client
) -> None:
    calibration = load_calibration(calibration_file)
    defaults = Settings()
    # Otherwise this test could not tell the calibrated values from the defaults.
    assert calibration.temperature != defaults.temperature
    assert calibration.threshold != defaults.threshold
    assert calibration.fallback_rate == 0.0
    in_domain = [p for t in ("math", "cooking", "travel") for p in topic_prompts(t, 2, 500)]
    ood = read_prompts(Path(__file__).resolve().parent.parent / "bench/data/ood_eval.jsonl")[:6]
    fallbacks = 0
    for text in in_domain + ood:
        body = calibrated_http.post("/v1/route", json={"text": text,
                                                       "routing": {"explain": 100}}).json()
        scores = body["scores"]
        ids = list(scores)
        best = max(scores, key=scores.get)
        nearest = max(e["score"] for e in body["nearest"] if e["adapter"] == best)
        features = fallback_features(np.array([[scores[i] for i in ids]]), np.array([nearest]))
        assert body["fallback"] == bool(should_fall_back(
            features, calibration.apply(RoutingOptions()))[0]), text
        fallbacks += body["fallback"]
        if not body["fallback"]:
            weights = sharpen(np.array([scores[i] for i in ids]), calibration.temperature,
                              calibration.sharpening)
            for hit in body["adapters"]:
                assert hit["weight"] == pytest.approx(weights[ids.index(hit["id"])], rel=1e-6)
    assert fallbacks >= 1  # some OOD prompt is caught by the calibrated threshold


# --- the fallback rules -------------------------------------------------------------------
def test_every_rule_keeps_the_false_fallback_bound_and_the_best_is_chosen() -> None:
    """In-domain queries whose centroid score overlaps the OOD ones but whose nearest exemplar
    separates them: the nearest and learned rules catch more OOD, and the simpler wins ties."""
    from router_index.calibrate import choose_rule, fallback_rules

    rng = np.random.default_rng(3)
    inside_best = rng.uniform(0.3, 0.6, 200)
    ood_best = rng.uniform(0.25, 0.5, 100)
    scores = np.stack([inside_best, inside_best - 0.1], axis=1)
    ood_scores = np.stack([ood_best, ood_best - 0.02], axis=1)
    held = HeldOutScores(("a", "b"), scores, np.zeros(200, dtype=np.int64), ood_scores,
                         nearest=rng.uniform(0.7, 0.95, 200),
                         ood_nearest=rng.uniform(0.2, 0.6, 100))
    rows, rules = fallback_rules(held, max_false_fallback=0.0)
    by_rule = {r.rule: r for r in rows}
    assert set(by_rule) == {"centroid", "nearest", "learned"}
    assert all(r.fallback_rate == 0.0 for r in rows)
    assert by_rule["centroid"].ood_fallback_rate < 0.3
    assert by_rule["nearest"].ood_fallback_rate == 1.0
    assert by_rule["learned"].ood_fallback_rate >= 0.99
    assert choose_rule(rows) == "nearest"  # as good as learned, and simpler
    assert rules["learned"].fallback_weights is not None


def test_logistic_fit_separates_and_place_threshold_respects_the_bound() -> None:
    from router_index.fallback import fit_logistic, place_threshold

    rng = np.random.default_rng(0)
    inside, outside = rng.normal(1.0, 0.3, (300, 3)), rng.normal(-1.0, 0.3, (300, 3))
    w = fit_logistic(inside, outside)
    assert ((inside @ w[:3] + w[3]) > 0).mean() > 0.99
    assert ((outside @ w[:3] + w[3]) < 0).mean() > 0.99
    values = np.array([0.1, 0.2, 0.3, 0.4])
    cut = place_threshold(values, np.array([0.05, 0.25]), max_false_fallback=0.25)
    assert (values < cut).mean() <= 0.25 and cut == pytest.approx(0.125)
