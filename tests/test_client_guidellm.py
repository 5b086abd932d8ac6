"""guidellm, the load generator people point at OpenAI-compatible servers, against a live
server on loopback: a short bounded run (synthetic prompts, a handful of requests) whose
report must show only successful requests with the token counts that were asked for.

guidellm 0.2.1 is the newest release that fits the lock: 0.3 to 0.8.1 pin click below 8.5
(0.8.1: click~=8.4.0) and the lock has click==8.5.1. 0.2.1's CLI is `guidellm benchmark`
(0.3 on: `guidellm run`), and GUIDELLM__PREFERRED_ROUTE picks completions or chat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server import LiveServer

from adapters.zoo.micro import MicroZoo
from app.engine.engine import Engine
from app.main import create_app

REQUESTS = 6
PROMPT_TOKENS = 24
OUTPUT_TOKENS = 6


@pytest.fixture(scope="module")
def url(micro_engine: Engine) -> Iterator[str]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield live.url


def _run(url: str, zoo: MicroZoo, out: Path, route: str) -> dict:
    report = out / "report.json"
    command = [
        sys.executable, "-m", "guidellm", "benchmark", "--target", url, "--model", "auto",
        "--processor", str(zoo.base_dir),
        "--data", f"prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--rate-type", "concurrent", "--rate", "2.0",  # a float: 0.2.1 calls is_integer
        "--max-requests", str(REQUESTS), "--max-seconds", "60",
        "--output-path", str(report), "--disable-progress", "--random-seed", "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GUIDELLM__PREFERRED_ROUTE": route, "GUIDELLM__MAX_WORKER_PROCESSES": "2"}
    done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("route", ["text_completions", "chat_completions"])
def test_bounded_benchmark_completes_with_the_asked_token_counts(
    url: str, micro_engine: Engine, micro_zoo: MicroZoo, tmp_path: Path, route: str
) -> None:
    (benchmark,) = _run(url, micro_zoo, tmp_path, route)["benchmarks"]
    assert benchmark["request_totals"] == {"successful": REQUESTS, "errored": 0,
                                           "incomplete": 0, "total": REQUESTS}
    requests = benchmark["requests"]["successful"]
    assert len(requests) == REQUESTS
    for request in requests:
        assert request["request_type"] == route and request["output"]
        # Token counts are the server's usage; ignore_eos makes each answer as long as asked.
        assert request["output_tokens"] == OUTPUT_TOKENS
        if route == "text_completions":  # the synthetic prompt, as the engine tokenises it
            served = len(micro_engine.tokenizer(request["prompt"])["input_ids"])
            assert request["prompt_tokens"] == served
            # guidellm cuts its synthetic text at 24 of its tokens and decodes it; encoding
            # that text again (and a BOS token) moves the count by a few
            assert abs(served - PROMPT_TOKENS) <= 8  # 24 to 27 seen
        else:  # the chat template adds its role markers
            assert request["prompt_tokens"] > PROMPT_TOKENS
        assert 0 < request["time_to_first_token_ms"] <= 1000 * request["request_latency"]
