"""Each defect schemathesis found (tests/test_fuzz.py), as a test of its own."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server import LiveServer

from adapters.zoo.micro import topic_prompts
from app.engine.engine import Engine
from app.main import create_app

HI = [{"role": "user", "content": "What is 2 plus 3?"}]
MATH = topic_prompts("math", 1, 1000)[0]


@pytest.fixture(scope="module")
def http(micro_engine: Engine) -> Iterator[httpx.Client]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live, \
            live.client() as client:
        yield client


def _chat(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/chat/completions",
                     json={"model": "base", "messages": HI, "max_tokens": 2, **fields})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/generate", {"prompt": "Hi", "chat": 0}, "chat"),  # 0 is not false
    ("/v1/route", {"text": "Hi", "routing": {"explain": False}}, "routing.explain"),
    ("/v1/completions", {"model": "base", "prompt": "Hi", "echo": 0}, "echo"),
    ("/v1/chat/completions", {"model": "base", "messages": HI, "max_tokens": "5"},
     "max_tokens"),
    ("/v1/chat/completions", {"model": "base", "messages": HI, "stream": 1}, "stream"),
])
def test_values_of_another_type_are_not_coerced(
    http: httpx.Client, path: str, body: dict, param: str
) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_whole_float_is_an_integer(http: httpx.Client) -> None:
    """JSON Schema's `integer` includes 3.0, so the server takes it."""
    response = _chat(http, max_tokens=2.0, n=1.0)
    assert response.status_code == 200, response.text
    assert _chat(http, max_tokens=2.5).status_code == 400


def test_max_tokens_is_checked_when_max_completion_tokens_is_given(
    http: httpx.Client, micro_engine: Engine
) -> None:
    too_many = micro_engine.settings.max_tokens_limit + 1
    response = _chat(http, max_completion_tokens=2, max_tokens=too_many)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_allow_lists_every_method_of_the_path(http: httpx.Client) -> None:
    response = http.request("OPTIONS", "/v1/adapters")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert http.request("TRACE", "/health").headers["allow"] == "GET"


def test_a_tiny_sampling_temperature_is_greedy_not_a_500(http: httpx.Client) -> None:
    greedy = _chat(http, temperature=0, max_tokens=6).json()["choices"][0]["message"]
    for temperature in (1e-30, 6.48e-187, 5e-324):
        response = _chat(http, temperature=temperature, max_tokens=6, n=2)
        assert response.status_code == 200, response.text
        assert all(c["message"] == greedy for c in response.json()["choices"])


def test_a_tiny_routing_temperature_is_a_400_not_nan_weights(http: httpx.Client) -> None:
    response = http.post("/v1/route", json={"text": MATH, "routing": {"temperature": 5e-324}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "routing.temperature"
    smallest = http.post("/v1/route", json={"text": MATH, "routing": {"temperature": 1e-6}})
    weights = [a["weight"] for a in smallest.json()["adapters"]]
    assert smallest.status_code == 200 and all(0 <= w <= 1 for w in weights)


def test_a_prompt_that_falls_back_previews_an_empty_merge(http: httpx.Client) -> None:
    response = http.post("/v1/merge/preview",
                         json={"prompt": MATH, "routing": {"threshold": 0.99}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] is True and body["adapters"] == [] and body["modules"] == 0
