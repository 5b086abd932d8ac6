"""Every error case: its status and the OpenAI envelope, and the server still answers after."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from pydantic import SecretStr
from server import LiveServer

from app.engine.engine import Engine
from app.main import create_app

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "What is 2 plus 3?"}]
LIMIT = 4096


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    settings = micro_engine.settings.model_copy(update={
        "api_key": SecretStr(KEY), "max_body_bytes": LIMIT, "max_tokens_limit": 64,
        "default_max_tokens": 8, "max_n": 4,
    })
    with LiveServer(create_app(settings, micro_engine)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers=AUTH) as client:
        yield client


@pytest.fixture(autouse=True)
def still_answers(http: httpx.Client) -> Iterator[None]:
    """After every error case the server must still serve a real request."""
    yield
    response = http.post("/v1/chat/completions",
                         json={"model": "auto", "messages": HI, "max_tokens": 2})
    assert response.status_code == 200, response.text


def _error(response: httpx.Response, status: int, code: str | None = None,
           param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def _chat(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "auto", "messages": HI, **fields})


def test_malformed_json_and_wrong_shape_are_400(http: httpx.Client) -> None:
    bad = http.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [',
                    headers={"content-type": "application/json"})
    _error(bad, 400, "invalid_json")
    _error(http.post("/v1/chat/completions", json={"model": "auto"}), 400, param="messages")
    _error(_chat(http, max_tokens="many"), 400, "invalid_schema", "max_tokens")
    _error(_chat(http, routing={"top_k": 1, "sharpness": 3}), 400)


def test_unknown_model_is_404_on_model(http: httpx.Client, server: LiveServer) -> None:
    _error(_chat(http, model="gpt-4"), 404, "model_not_found", "model")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=HI)
    assert caught.value.body["param"] == "model"
    _error(_chat(http, routing={"adapters": ["nope"]}), 404, param="routing.adapters")


def test_max_tokens_out_of_range_is_400(http: httpx.Client) -> None:
    _error(_chat(http, max_tokens=0), 400, "invalid_parameter", "max_tokens")
    _error(_chat(http, max_tokens=65), 400, "invalid_parameter", "max_tokens")
    _error(_chat(http, max_completion_tokens=1000), 400, param="max_completion_tokens")
    _error(_chat(http, n=5), 400, param="n")
    _error(_chat(http, temperature=3.5), 400, param="temperature")
    _error(_chat(http, routing={"top_k": 0}), 400, param="routing.top_k")


def test_empty_messages_and_prompt_are_400(http: httpx.Client) -> None:
    _error(_chat(http, messages=[]), 400, param="messages")
    _error(http.post("/v1/completions", json={"model": "auto", "prompt": ""}), 400,
           param="prompt")


def test_prompt_over_the_context_length_is_400(http: httpx.Client) -> None:
    long = [{"role": "user", "content": "What is 2 plus 3? " * 150}]
    error = _error(_chat(http, messages=long), 400, "context_length_exceeded")
    assert "context length" in error["message"]


def test_unknown_merge_method_names_the_valid_ones(http: httpx.Client) -> None:
    error = _error(_chat(http, merge={"method": "slerp"}), 400, param="merge.method")
    assert "linear" in error["message"] and "ties" in error["message"]
    # A parameter the method does not have is an unknown field of a strict object: 400.
    _error(_chat(http, merge={"method": "linear", "density": 0.5}), 400, param="merge.density")
    _error(_chat(http, merge={"method": "ties", "density": 1.5}), 400, param="merge.density")
    _error(_chat(http, merge={"method": "dare_ties", "drop_rate": 1.0}), 400,
           param="merge.drop_rate")
    _error(_chat(http, merge={"method": "ties", "rank": 0}), 400, param="merge.rank")


def test_body_over_the_limit_is_413_with_or_without_content_length(http: httpx.Client) -> None:
    big = [{"role": "user", "content": "x" * (LIMIT + 10)}]
    _error(_chat(http, messages=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 512 + 1):
            yield b"y" * 512
        yield b'"}]}'

    streamed = http.post("/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    _error(streamed, 413, "request_too_large")


def test_missing_or_wrong_api_key_is_401(server: LiveServer) -> None:
    with server.client() as anonymous:
        error = _error(anonymous.post("/v1/chat/completions", json={"model": "auto",
                                                                    "messages": HI}), 401)
        assert error["type"] == "authentication_error"
        _error(anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert anonymous.get("/health").status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_admin_without_a_configured_key_is_403(http: httpx.Client) -> None:
    error = _error(http.post("/v1/adapters", json={"id": "math"}), 403, "admin_disabled")
    assert error["type"] == "permission_error"
    _error(http.delete("/v1/adapters/math"), 403, "admin_disabled")


def test_unknown_route_404_and_wrong_method_405(http: httpx.Client) -> None:
    _error(http.get("/v1/nothing"), 404, "route_not_found")
    _error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_not_ready_and_draining_are_503(http: httpx.Client, micro_engine: Engine) -> None:
    micro_engine.draining = True  # what SIGTERM does; restored before the next request
    try:
        _error(http.get("/ready"), 503, "not_ready")
        refused = _chat(http)
        _error(refused, 503, "not_ready")
        assert int(refused.headers["retry-after"]) >= 1
        _error(_chat(http, stream=True), 503, "not_ready")
        assert http.get("/health").json() == {"status": "draining"}
    finally:
        micro_engine.draining = False


def test_streaming_requests_fail_before_the_first_byte(http: httpx.Client) -> None:
    for fields, status in [({"model": "nope"}, 404), ({"max_tokens": 0}, 400),
                           ({"merge": {"method": "dare"}}, 400)]:
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "auto", "messages": HI, "stream": True, **fields}) as r:
            r.read()
            _error(r, status)
