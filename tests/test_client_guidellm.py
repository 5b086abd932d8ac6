"""guidellm, the load generator people point at OpenAI-compatible servers, against a live
server on loopback: a short bounded run (synthetic prompts, a handful of requests) whose
report must show only successful requests with the token counts that were asked for.

guidellm is not in the lock (.ci/constraints.txt): every release (0.3 to 0.8.1) pins click
below 8.5 (0.8.1: click~=8.4.0) while the lock pins click==8.5.1. It skips without guidellm;
the `clients` extra installs it (outside the lock).
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

pytest.importorskip("guidellm")

REQUESTS = 6
PROMPT_TOKENS = 24
OUTPUT_TOKENS = 6


@pytest.fixture(scope="module")
def url(micro_engine: Engine) -> Iterator[str]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield live.url


def _run(url: str, zoo: MicroZoo, out: Path, request_format: str) -> dict:
    report = out / "report.json"
    command = [
        sys.executable, "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={url},model=auto,"
                     f"request_format={request_format}",
        "--profile", "kind=concurrent,streams=2",
        "--constraint", f"kind=max_requests,count={REQUESTS}",
        "--constraint", "kind=max_duration,seconds=60",
        "--tokenizer", f"kind=huggingface_auto,model={zoo.base_dir}",
        "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},"
                  f"output_tokens={OUTPUT_TOKENS}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GUIDELLM__LOGGING__DISABLED": "true"}
    done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("request_format", ["/v1/completions", "/v1/chat/completions"])
def test_bounded_benchmark_completes_with_the_asked_token_counts(
    url: str, micro_zoo: MicroZoo, tmp_path: Path, request_format: str
) -> None:
    report = _run(url, micro_zoo, tmp_path, request_format)
    (benchmark,) = report["benchmarks"]
    requests = benchmark["requests"]
    assert len(requests["successful"]) == REQUESTS
    assert not requests["errored"] and not requests["incomplete"]
    for request in requests["successful"]:
        body = json.loads(request["request_args"])["body"]
        assert body["model"] == "auto" and OUTPUT_TOKENS in (
            body.get("max_tokens"), body.get("max_completion_tokens"))
        # Counts are the server's usage; ignore_eos makes every answer exactly as long as
        # asked. guidellm counts the stream chunks that carry text: at most one per token (a
        # token that completes no character, as the random micro model emits, has none).
        assert request["output_tokens"] == OUTPUT_TOKENS
        assert 1 <= request["info"]["timings"]["token_iterations"] <= OUTPUT_TOKENS
        assert request["output"]
        if "prompt" in body:  # /v1/completions: the synthetic prompt's own length
            assert request["prompt_tokens"] == PROMPT_TOKENS
        else:  # the chat template adds its role markers
            assert request["prompt_tokens"] > PROMPT_TOKENS
        assert request["time_to_first_token_ms"] > 0
