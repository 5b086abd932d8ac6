"""The zoo fingerprint: one short hash over an adapter store's weights and configs.

Results files (docs/results.md, tables in docs/benchmarks.md) name the fingerprint of the zoo
they were measured on, so that a retrained zoo makes them visibly stale:
tests/test_results_fingerprint.py fails when a committed file names another fingerprint than
the shipped demo zoo's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters.registry import CONFIG_FILE, WEIGHTS_FILE, list_store

__all__ = ["DEMO_STORE", "FINGERPRINT_LABEL", "zoo_fingerprint"]

DEMO_STORE = Path(__file__).resolve().parent / "zoo" / "demo"
# How results files write it, e.g. "zoo fingerprint `zoo-1a2b3c4d5e6f`": one spelling, so a
# test can find every mention.
FINGERPRINT_LABEL = "zoo fingerprint"
_PREFIX = "zoo-"


def zoo_fingerprint(store: Path = DEMO_STORE) -> str:
    """`zoo-` and 12 hex digits of a SHA-256 over each adapter's id, config and weight bytes
    (ids sorted; an adapter in a named subfolder is hashed from there). Eval sets, exemplars
    and calibration are left out: they are inputs of a measurement, not the zoo itself."""
    digest = hashlib.sha256()
    for adapter_id in list_store(store):
        top = store / adapter_id
        files = sorted(top.rglob(CONFIG_FILE)) + sorted(top.rglob(WEIGHTS_FILE))
        digest.update(f"\x00{adapter_id}\x00".encode())
        for path in files:
            digest.update(f"\x01{path.relative_to(top).as_posix()}\x01".encode())
            digest.update(_sha256(path))
    return _PREFIX + digest.hexdigest()[:12]


def _sha256(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()
