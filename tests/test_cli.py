"""Every `dynamerge` subcommand, wired to its handler and run once: on the micro zoo through
DYNAMERGE_* variables, and the zoo commands on the demo base (slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.registry import inspect_adapter
from adapters.zoo.micro import MicroZoo, topic_prompts
from app import cli
from app.settings import Settings

MATH = topic_prompts("math", 1, 1000)[0]


@pytest.fixture
def micro_env(micro_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The micro zoo as DYNAMERGE_* variables, for this process and for subprocesses."""
    env = {
        "DYNAMERGE_BASE_MODEL": str(micro_settings.base_model),
        "DYNAMERGE_ADAPTER_STORE": str(micro_settings.adapter_store),
        "DYNAMERGE_CACHE_DIR": str(micro_settings.cache_dir),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_every_subcommand_has_a_handler() -> None:
    assert set(cli._COMMANDS) == {"serve", "route", "generate", "merge", "zoo", "calibrate",
                                  "adapters"}
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_serve_answers_health_then_stops_cleanly_on_sigterm(micro_env: dict[str, str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **micro_env, "DYNAMERGE_HOST": "127.0.0.1",
           "DYNAMERGE_PORT": str(port), "DYNAMERGE_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ready = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if http.get("/health").status_code == 200:
                        ready = http.get("/ready")
                        if ready.status_code == 200:
                            break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert ready is not None and ready.status_code == 200, process.poll()
            chat = http.post("/v1/chat/completions", json={
                "model": "auto", "max_tokens": 2,
                "messages": [{"role": "user", "content": MATH}]})
            assert chat.status_code == 200 and chat.json()["routing"]["adapters"][0]["id"] == (
                "math")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0  # drained: a clean stop
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_route_prints_the_decision(micro_env: dict[str, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["route", MATH, "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (
        ["math"], ["cooking"], ["travel"])]
    assert rows[0][0] == "math" and len(rows) >= 3
    assert rows[0][2] != "-" and all(r[2] == "-" for r in rows[1:])  # top-1: math alone
    assert "fallback: False" in out and "nearest exemplars:" in out


def test_generate_prints_the_blend_and_the_answer(
    micro_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", MATH, "--max-tokens", "4", "--model", "cooking"]) == 0
    captured = capsys.readouterr()
    assert "[blend: cooking=1.000]" in captured.err
    assert captured.out.endswith("\n")


def test_merge_writes_an_adapter_that_peft_loads(
    micro_env: dict[str, str], micro_zoo: MicroZoo, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapters", "math,cooking", "--weights", "0.7,0.3",
                     "--method", "ties", "--rank", "8", "--param", "density=0.5",
                     "--out", str(out)]) == 0
    assert "ties, rank 8" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir)
    shapes = {name: tuple(module.weight.shape) for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear)}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(ids).logits
        merged = PeftModel.from_pretrained(base, out)
        after = merged(ids).logits
    assert not torch.allclose(before, after)  # the merge changes the model
    assert inspect_adapter(out.parent, out.name, shapes).id == "merged"  # our store takes it
    exemplars = (out / "exemplars.jsonl").read_text().splitlines()
    assert len(exemplars) == len(micro_zoo.exemplars("math")) + len(
        micro_zoo.exemplars("cooking"))


def test_merge_refuses_mismatched_weights_and_unknown_adapters(
    micro_env: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match="2 adapters but 1 weights"):
        cli.main(["merge", "--adapters", "math,cooking", "--weights", "1", "--out",
                  str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="unknown adapters"):
        cli.main(["merge", "--adapters", "math,nope", "--weights", "0.5,0.5", "--out",
                  str(tmp_path / "x")])


def test_calibrate_writes_a_calibration_the_server_reads(
    micro_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration.json"
    assert cli.main(["calibrate", "--out", str(out), "--folds", "2"]) == 0
    calibration = json.loads(out.read_text())
    assert calibration["temperature"] > 0 and -1 <= calibration["threshold"] <= 1
    assert f"DYNAMERGE_CALIBRATION_FILE={out.resolve()}" in capsys.readouterr().out
    settings = Settings(calibration_file=out)
    assert settings.calibration_file == out


def test_zoo_train_is_wired_to_train_then_evaluate(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    # A fake, because the real thing cannot run here: training six adapters takes minutes of
    # CPU per task. This checks the wiring only (tasks and Settings' cache folder passed on,
    # the table printed).
    from adapters.zoo import evaluate as zoo_eval
    from adapters.zoo import train as zoo_train

    calls: list[object] = []
    monkeypatch.setenv("DYNAMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(zoo_train, "train",
                        lambda cache_dir, tasks=None: calls.append((cache_dir, tasks)))
    monkeypatch.setattr(zoo_eval, "evaluate",
                        lambda cache_dir, limit=None: calls.append((cache_dir, "eval", limit)))
    monkeypatch.setattr(zoo_eval, "format_table", lambda table: "TABLE")
    assert cli.main(["zoo", "train", "--tasks", "sentiment,arithmetic"]) == 0
    assert calls == [(tmp_path, ["sentiment", "arithmetic"]), (tmp_path, "eval", None)]
    assert capsys.readouterr().out.strip() == "TABLE"


@pytest.mark.slow
def test_zoo_build_and_eval_on_the_demo_base(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["zoo", "build"]) == 0
    base = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (base / "config.json").is_file()
    assert cli.main(["zoo", "eval", "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "|" in table


def test_adapters_check_prints_served_and_refused(micro_env: dict[str, str], micro_zoo: MicroZoo,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["adapters", "check", str(micro_zoo.store_dir)]) == 0
    out = capsys.readouterr().out
    assert "math: served" in out and "q_proj" in out and "scaling=" in out
    store = tmp_path / "store"
    import shutil
    shutil.copytree(micro_zoo.store_dir / "math", store / "v_dora")
    config = store / "v_dora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    assert cli.main(["adapters", "check", str(store / "v_dora")]) == 1
    assert "v_dora: refused" in capsys.readouterr().out
