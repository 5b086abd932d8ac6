"""REST, admin and health endpoints over HTTP against a live server."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from server import LiveServer

from adapters.zoo.micro import MicroZoo, topic_prompts
from app.engine.engine import Engine
from app.main import create_app

MATH = topic_prompts("math", 1, 1000)[0]
ADMIN = {"Authorization": "Bearer admin-secret"}
ASTRONOMY = [
    "Which planet has the most moons?", "How far is the Moon from the Earth?",
    "What is a black hole made of?", "Why do stars twinkle at night?",
    "How many planets orbit the Sun?", "What is the Andromeda galaxy?",
    "When is the next total solar eclipse?", "How hot is the surface of the Sun?",
]


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    settings = micro_engine.settings.model_copy(update={"admin_key": SecretStr("admin-secret")})
    with LiveServer(create_app(settings, micro_engine)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_route_returns_the_whole_decision(http: httpx.Client) -> None:
    decision = http.post("/v1/route", json={"text": MATH}).json()
    assert set(decision["scores"]) == {"math", "cooking", "travel"}
    assert decision["adapters"][0]["id"] == "math"
    assert decision["adapters"][0]["score"] == decision["scores"]["math"]
    assert decision["fallback"] is False and decision["latency_ms"] > 0
    assert decision["nearest"][0]["adapter"] == "math" and decision["nearest"][0]["text"]
    chat = http.post("/v1/route", json={
        "messages": [{"role": "user", "content": MATH}, {"role": "assistant", "content": "4"}],
        "routing": {"top_k": 1, "explain": 2},
    }).json()
    assert [a["id"] for a in chat["adapters"]] == ["math"] and len(chat["nearest"]) == 2


def test_generate_plain_text(http: httpx.Client) -> None:
    response = http.post("/v1/generate", json={"prompt": MATH, "max_tokens": 4, "seed": 1})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["text"], str) and body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 4
    assert body["routing"]["adapters"][0]["id"] == "math"
    assert response.headers["x-dynamerge-adapters"].startswith("math=")
    raw = http.post("/v1/generate", json={"prompt": "Hello", "chat": False, "model": "cooking",
                                          "max_tokens": 3, "merge": {"method": "linear"}})
    assert raw.json()["routing"]["adapters"] == [{"id": "cooking", "score": None, "weight": 1.0}]


def test_embeddings_float_and_base64(http: httpx.Client) -> None:
    floats = http.post("/v1/embeddings", json={"input": ["a cat", "a dog"], "model": "x"}).json()
    assert floats["object"] == "list" and [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["model"] == "all-MiniLM-L6-v2" and floats["usage"]["total_tokens"] > 0
    packed = http.post("/v1/embeddings", json={"input": "a cat", "model": "x",
                                               "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_admin_registers_and_removes_an_adapter_live(
    http: httpx.Client, micro_zoo: MicroZoo
) -> None:
    new_dir = micro_zoo.store_dir / "astronomy"
    shutil.copytree(micro_zoo.store_dir / "math", new_dir)
    (new_dir / "exemplars.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ASTRONOMY)
    )
    question = {"text": "How many moons does Jupiter have?"}
    try:
        assert http.post("/v1/adapters", json={"id": "astronomy"}).status_code == 401
        added = http.post("/v1/adapters", json={"id": "astronomy"}, headers=ADMIN)
        assert added.status_code == 201 and "astronomy" in added.json()["adapters"]
        again = http.post("/v1/adapters", json={"id": "astronomy"}, headers=ADMIN)
        assert again.status_code == 409
        assert "astronomy" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        decision = http.post("/v1/route", json=question).json()
        assert decision["adapters"][0]["id"] == "astronomy"
        chat = http.post("/v1/chat/completions", json={
            "model": "auto", "max_tokens": 3,
            "messages": [{"role": "user", "content": question["text"]}],
        })
        assert chat.json()["routing"]["adapters"][0]["id"] == "astronomy"

        removed = http.delete("/v1/adapters/astronomy", headers=ADMIN)
        assert removed.status_code == 200 and "astronomy" not in removed.json()["adapters"]
        assert "astronomy" not in http.post("/v1/route", json=question).json()["scores"]
        assert "astronomy" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
        gone = http.post("/v1/chat/completions", json={
            "model": "astronomy", "messages": [{"role": "user", "content": "hi"}],
        })
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
        assert http.delete("/v1/adapters/astronomy", headers=ADMIN).status_code == 404
        missing = http.post("/v1/adapters", json={"id": "nowhere"}, headers=ADMIN)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "adapter_not_found"
    finally:
        if "astronomy" in [m["id"] for m in http.get("/v1/models").json()["data"]]:
            http.delete("/v1/adapters/astronomy", headers=ADMIN)
        shutil.rmtree(new_dir)


def test_health_ready_and_metrics(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["adapters"] >= 3  # a count: a store may hold thousands
    http.post("/v1/route", json={"text": MATH})
    http.post("/v1/chat/completions",
              json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'dynamerge_requests_total{endpoint="/v1/route",model="auto",status="200"}' in text
    assert 'endpoint="/v1/chat/completions",model="unknown",status="404"' in text
    assert 'dynamerge_requests_total{endpoint="/ready",model="",status="200"}' in text
    assert "dynamerge_time_to_first_token_seconds_count" in text


def test_merge_preview_for_adapters_and_for_a_routed_prompt(http: httpx.Client) -> None:
    body = http.post("/v1/merge/preview",
                     json={"adapters": ["math", "cooking"], "max_modules": 6}).json()
    assert body["adapters"] == ["math", "cooking"] and 1 <= body["modules"] <= 6
    assert len(body["cosine"]) == 2 and body["cosine"][0][0] == pytest.approx(1.0)
    assert 0.0 <= body["sign_conflict_total"] <= 1.0
    assert {"ties", "dare_ties", "neuro", "te"} <= set(body["removed_mass"])
    assert 0 < body["removed_mass"]["ties"]["math"] < 1
    assert set(body["parallel_fraction"]) == {"math", "cooking"}
    routed = http.post("/v1/merge/preview", json={
        "prompt": MATH, "routing": {"top_k": 2, "min_weight": 0}, "max_modules": 4}).json()
    assert routed["adapters"][0] == "math" and len(routed["adapters"]) == 2


@pytest.mark.parametrize(
    ("payload", "status"),
    [({"adapters": ["math", "nope"]}, 404), ({}, 400), ({"adapters": ["math"], "prompt": "x"}, 400),
     # a value out of range and a wrong type are both 400 (OpenAI's status for both)
     ({"adapters": ["math"], "max_modules": 0}, 400), ({"adapters": "math"}, 400)],
)
def test_merge_preview_errors(http: httpx.Client, payload: dict, status: int) -> None:
    response = http.post("/v1/merge/preview", json=payload)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
