"""Committed results name the zoo they were measured on, and it is the shipped one.

docs/results.md is written by `python -m bench.quality`, which puts the zoo fingerprint of the
store it measured into the file; tables in docs/benchmarks.md that depend on the zoo's weights
carry it too. A retrained zoo changes the fingerprint, and this test then fails until the
results are regenerated.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from adapters.fingerprint import DEMO_STORE, FINGERPRINT_LABEL, zoo_fingerprint
from adapters.registry import WEIGHTS_FILE

DOCS = Path(__file__).resolve().parent.parent / "docs"
MENTION = re.compile(re.escape(FINGERPRINT_LABEL) + r"\W*`?(zoo-[0-9a-f]+)", re.IGNORECASE)


def _named(path: Path) -> list[str]:
    return MENTION.findall(path.read_text(encoding="utf-8"))


def test_results_name_the_shipped_zoo() -> None:
    shipped = zoo_fingerprint()
    named = _named(DOCS / "results.md")
    assert named, f"docs/results.md names no {FINGERPRINT_LABEL}: regenerate it"
    assert set(named) == {shipped}, (
        f"docs/results.md was measured on {sorted(set(named))}, the shipped zoo is {shipped}: "
        "regenerate it with `python -m bench.quality`")


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_no_results_file_names_another_zoo(doc: str) -> None:
    assert set(_named(DOCS / doc)) <= {zoo_fingerprint()}


def test_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    """Stable across copies; one changed weight byte, or an adapter removed, changes it."""
    store = tmp_path / "demo"
    shutil.copytree(DEMO_STORE, store)
    shipped = zoo_fingerprint()
    assert zoo_fingerprint(store) == shipped
    assert re.fullmatch(r"zoo-[0-9a-f]{12}", shipped)
    (store / "calibration.json").unlink()  # measurement inputs are not the zoo
    assert zoo_fingerprint(store) == shipped

    weights = next(store.glob(f"*/{WEIGHTS_FILE}"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = zoo_fingerprint(store)
    assert changed != shipped

    shutil.rmtree(weights.parent)
    assert zoo_fingerprint(store) not in (shipped, changed)
