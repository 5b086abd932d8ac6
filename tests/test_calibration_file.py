"""The server's routing defaults come from settings, overridden by a calibration file."""

from __future__ import annotations

import json

from app.engine.engine import routing_defaults
from app.settings import Settings


def test_calibration_file_overrides_settings(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperature": 0.07, "threshold": 0.31, "top_k": None,
                                "routing_accuracy": 0.99}))
    options = routing_defaults(Settings(calibration_file=path, top_k=2, temperature=0.5))
    assert (options.temperature, options.threshold, options.top_k) == (0.07, 0.31, 2)
    assert routing_defaults(Settings(top_k=2)).threshold == Settings().threshold
