"""The server's routing defaults: settings, a calibration (file, shipped, cached or computed
at start-up), and settings given explicitly pinning their own value over it."""

from __future__ import annotations

import json
import shutil

import pytest

from app.engine.calibration import STORE_FILE, routing_defaults
from app.engine.engine import Engine
from app.settings import Settings


def test_a_calibration_file_gives_the_defaults_and_explicit_settings_pin(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperature": 0.07, "threshold": 0.31, "top_k": None,
                                "fallback": "nearest", "routing_accuracy": 0.99}))
    options = routing_defaults(Settings(calibration_file=path, top_k=2))
    assert (options.temperature, options.threshold, options.top_k) == (0.07, 0.31, 2)
    assert options.fallback == "nearest"
    pinned = routing_defaults(Settings(calibration_file=path, temperature=0.5, threshold=0.2))
    assert (pinned.temperature, pinned.threshold, pinned.fallback) == (0.5, 0.2, "centroid")
    assert routing_defaults(Settings(top_k=2)).threshold == Settings().threshold


def test_a_bad_calibration_file_is_refused_by_name(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperature": 0.07, "threshold": 0.31, "sharpening": "twostage"}))
    with pytest.raises(ValueError, match=r"calibration\.json"):
        routing_defaults(Settings(calibration_file=path))


def _engine(settings: Settings) -> Engine:
    engine = Engine(settings)
    engine.load(show_progress=False)
    return engine


def test_a_new_store_is_calibrated_at_start_up_once_then_read_from_the_cache(
        micro_zoo, tmp_path, caplog):
    store = tmp_path / "store"
    shutil.copytree(micro_zoo.store_dir, store)
    settings = Settings(base_model=micro_zoo.base_dir, adapter_store=store,
                        cache_dir=tmp_path / "cache")
    with caplog.at_level("INFO"):
        first = _engine(settings)
    calibrated = first.router.defaults
    first.shutdown()
    assert "calibrated for this store" in caplog.text
    cached = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(cached) == 1
    assert calibrated.temperature != Settings().temperature  # really the calibrated value

    caplog.clear()
    with caplog.at_level("INFO"):
        second = _engine(settings)
    assert second.router.defaults == calibrated
    second.shutdown()
    assert "calibrated for this store" not in caplog.text  # read, not computed

    shutil.copy(cached[0], store / STORE_FILE)  # shipped inside the store: used first
    shutil.rmtree(tmp_path / "cache" / "calibration")
    third = _engine(settings)
    assert third.router.defaults == calibrated
    third.shutdown()
    assert not (tmp_path / "cache" / "calibration").exists()

    (store / "cooking" / "exemplars.jsonl").write_text('{"text": "Only one new exemplar."}\n'
                                                      * 8)
    fourth = _engine(settings)  # the store changed: the shipped file no longer matches
    fourth.shutdown()
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 1


def test_calibration_off_uses_the_settings_alone(micro_zoo, tmp_path):
    engine = _engine(Settings(base_model=micro_zoo.base_dir, adapter_store=micro_zoo.store_dir,
                              cache_dir=tmp_path / "cache", calibration="off"))
    try:
        assert engine.router.defaults.temperature == Settings().temperature
        assert engine.router.defaults.fallback == "centroid"
    finally:
        engine.shutdown()
