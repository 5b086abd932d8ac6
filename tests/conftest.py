"""Shared fixtures: the micro zoo (built once per session) and an engine loaded on it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adapters.zoo.micro import MicroZoo, build_micro_zoo
from app.engine.engine import Engine
from app.settings import Settings


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> MicroZoo:
    return build_micro_zoo(tmp_path_factory.mktemp("micro_zoo"))


@pytest.fixture(scope="session")
def micro_settings(micro_zoo: MicroZoo, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Routing by the documented settings defaults (and Eq. 9's full top-K), not by a
    # calibration of the random micro zoo, so that tests can reason about weights and
    # fallbacks (test_calibration_file.py covers start-up calibration).
    return Settings(
        base_model=micro_zoo.base_dir,
        adapter_store=micro_zoo.store_dir,
        cache_dir=tmp_path_factory.mktemp("cache"),
        calibration="off",
        min_weight=0.0,  # every top-K hit, as Eq. 9 has it
        blend_weight_step=0.0,  # and its exact weights (test_kv_cache.py covers rounding)
    )


@pytest.fixture(scope="session")
def micro_engine(micro_settings: Settings) -> Engine:
    """One engine for the session; tests must leave its adapter set as they found it."""
    engine = Engine(micro_settings)
    engine.load(show_progress=False)
    yield engine
    engine.shutdown()




def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The image tests (tests/test_image.py: a dockerd, a build, containers) run last, so that
    the load they put on the machine and the daemon they start touch no other test."""
    items.sort(key=lambda item: item.get_closest_marker("image") is not None)
