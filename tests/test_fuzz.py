"""Schemathesis against a live server (micro zoo, API key and admin key set), with the app's
own OpenAPI document: every phase (examples, coverage, fuzzing, stateful), every check,
plus ours (tests/fuzz_hooks.py). Zero failures, and at least `FUZZ_MIN_CASES` cases.

CI runs a short pass; `FUZZ_EXAMPLES=300 pytest -m fuzz` is the full run (README "Fuzzing").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from server import LiveServer

from adapters.zoo.micro import MicroZoo
from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.fuzz

KEY, ADMIN = "sk-fuzz", "admin-fuzz"
# In the store, not loaded at start: the stateful phase registers them (one per scenario).
NEW = [f"astronomy-{i}" for i in range(int(os.environ.get("FUZZ_NEW_ADAPTERS", "60")))]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))  # per operation and phase
MIN_CASES = int(os.environ.get("FUZZ_MIN_CASES", "1000"))
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def server(micro_zoo: MicroZoo, micro_settings: Settings,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("fuzz_store")
    for adapter in micro_zoo.adapter_ids:
        shutil.copytree(micro_zoo.store_dir / adapter, store / adapter)
    exemplars = "".join(json.dumps({"text": t}) + "\n" for t in (
        "Which planet has the most moons?", "How far away is the Moon?",
        "Why do stars twinkle?", "What is a black hole?"))
    for adapter in NEW:
        shutil.copytree(micro_zoo.store_dir / "math", store / adapter)
        (store / adapter / "exemplars.jsonl").write_text(exemplars)
    settings = micro_settings.model_copy(update={
        "adapter_store": store, "adapters": list(micro_zoo.adapter_ids),
        "api_key": SecretStr(KEY), "admin_key": SecretStr(ADMIN),
        "placement_timeout_s": 10.0,
    })
    with LiveServer(create_app(settings)) as live, live.client() as http:
        deadline = time.monotonic() + 120
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the fuzz server did not get ready"
            time.sleep(0.1)
        assert not set(NEW) & {m["id"] for m in http.get(
            "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
        yield live


def test_schemathesis_finds_nothing(server: LiveServer, tmp_path: Path,
                                    micro_zoo: MicroZoo) -> None:
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        doc = http.get("/openapi.json")
    assert doc.status_code == 200
    schema = tmp_path / "openapi.json"
    schema.write_text(doc.text)
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        'hooks = "fuzz_hooks"\n'
        "[auth.openapi.apiKey]\n"
        f'bearer = "{KEY}"\n'
        "[auth.openapi.adminKey]\n"
        f'bearer = "{ADMIN}"\n'
    )
    report = Path(os.environ.get("FUZZ_REPORT", tmp_path / "report.ndjson"))
    store = server.app.state.settings.adapter_store
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "FUZZ_NEW_ADAPTERS": ",".join(NEW),
        "FUZZ_PRIVATE_PATHS": os.pathsep.join(
            [str(TESTS.parent), str(store), str(micro_zoo.base_dir)]),
    }
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        str(schema), "--url", server.url, "--checks", "all", "--max-examples", str(EXAMPLES),
        "--phases", "examples,coverage,fuzzing,stateful", "--seed", "20240611",
        "--workers", "1", "--request-timeout", "60", "--generation-database", "none",
        "--report", "ndjson", "--report-ndjson-path", str(report), "--no-color",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200,
                          check=False)
    output = done.stdout + done.stderr
    cases, failures = _tally(report)
    assert done.returncode == 0 and failures == 0, output[-12000:]
    assert sum(cases.values()) >= MIN_CASES, f"only {cases} cases ran\n{output[-3000:]}"
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", output)
    assert cases.get("stateful", 0) > 0 and links, output[-3000:]
    # add, use, delete, use again, add again; and retrieve the adapter as a model. Which
    # links a scenario reaches depends on the server's answers under load: this seed covers
    # all five on a quiet machine, 4 once in a loaded CI-like run (other seeds: 3), so one
    # missed link is tolerated; a broken lifecycle covers fewer.
    assert links[2] == "5" and int(links[1]) >= 4, f"{links[0]}\n{output[-3000:]}"
    print(f"schemathesis: {sum(cases.values())} cases {cases}, {failures} failures")


def _tally(report: Path) -> tuple[dict[str, int], int]:
    """Cases run per phase and failed checks, from schemathesis' NDJSON event log."""
    cases: dict[str, int] = {}
    failures = 0
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if event is None:
            continue
        recorder = event.get("recorder") or {}
        phase = event.get("phase", "?")
        cases[phase] = cases.get(phase, 0) + len(recorder.get("cases") or {})
        failures += sum(1 for checks in (recorder.get("checks") or {}).values()
                        for check in checks if check.get("status") == "failure")
    return cases, failures
