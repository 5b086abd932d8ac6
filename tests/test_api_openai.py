"""The OpenAI-compatible API, driven by the official `openai` client against a live server."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server import LiveServer

from adapters.zoo.micro import topic_prompts
from app.engine.engine import Engine
from app.main import create_app

MATH = topic_prompts("math", 1, 1000)[0]
TRAVEL = topic_prompts("travel", 1, 1000)[0]


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, text: str, **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": text}], **{"model": "auto", "max_tokens": 6, **kwargs}
    )
    return raw.parse(), raw.headers


def _ids(routing: dict) -> list[str]:
    return [a["id"] for a in routing["adapters"]]


def test_chat_auto_routes_to_the_topic_adapter(client: openai.OpenAI) -> None:
    response, headers = _chat(client, MATH)
    assert response.object == "chat.completion"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 6
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )
    routing = response.routing
    assert routing["method"] == "linear" and routing["fallback"] is False
    assert routing["cache_hit"] is False
    assert _ids(routing)[0] == "math"
    assert sum(a["weight"] for a in routing["adapters"]) <= 1 + 1e-6
    assert headers["x-dynamerge-adapters"].startswith("math=")


def test_chat_stream_carries_routing_usage_and_done(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": MATH}], max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _ids(chunks[0].routing)[0] == "math"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    greedy, _ = _chat(client, MATH, temperature=0)
    streamed = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": MATH}], max_tokens=6, stream=True,
        temperature=0,
    ))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        greedy.choices[0].message.content
    )


def test_stream_is_server_sent_events_ending_with_done(server: LiveServer) -> None:
    body = {"model": "base", "prompt": "Hello", "max_tokens": 3, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-dynamerge-adapters"] == "base"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    response = client.completions.create(model="auto", prompt=TRAVEL, max_tokens=5)
    assert response.object == "text_completion"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert _ids(response.routing)[0] == "travel"
    assert response.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model="auto", prompt=TRAVEL, max_tokens=5,
                                            stream=True))
    assert _ids(chunks[0].routing)[0] == "travel"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_model_base_and_named_adapter(client: openai.OpenAI) -> None:
    base, headers = _chat(client, MATH, model="base")
    assert base.routing["adapters"] == [] and headers["x-dynamerge-adapters"] == "base"
    forced, headers = _chat(client, MATH, model="travel")
    assert forced.routing["adapters"] == [{"id": "travel", "score": None, "weight": 1.0}]
    assert headers["x-dynamerge-adapters"] == "travel=1.000"


def test_extra_body_routing_changes_the_decision(client: openai.OpenAI) -> None:
    # Restricted to travel, a math prompt scores below the default threshold: lower it.
    restricted = {"routing": {"adapters": ["travel"], "threshold": -1.0}}
    forced, _ = _chat(client, MATH, extra_body=restricted)
    assert _ids(forced.routing) == ["travel"]
    top1, headers = _chat(client, MATH, extra_body={"routing": {"top_k": 1}})
    assert _ids(top1.routing) == ["math"] and "," not in headers["x-dynamerge-adapters"]
    renormalized, _ = _chat(
        client, MATH, extra_body={"routing": {"top_k": 2, "renormalize": True},
                                  "merge": {"method": "linear"}},
    )
    assert sum(a["weight"] for a in renormalized.routing["adapters"]) == pytest.approx(1.0)
    fallback, headers = _chat(client, MATH, extra_body={"routing": {"threshold": 0.99}})
    assert fallback.routing["fallback"] is True and fallback.routing["adapters"] == []


def test_n_choices_are_seeded_seed_plus_i(client: openai.OpenAI) -> None:
    both = client.completions.create(model="base", prompt="Hello", max_tokens=8, n=2, seed=7,
                                     temperature=1.0)
    assert [c.index for c in both.choices] == [0, 1]
    second = client.completions.create(model="base", prompt="Hello", max_tokens=8, seed=8,
                                       temperature=1.0)
    assert second.choices[0].text == both.choices[1].text
    assert both.usage.prompt_tokens == second.usage.prompt_tokens  # the prompt counts once
    assert second.usage.completion_tokens < both.usage.completion_tokens <= 16
    chat = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": MATH}], max_completion_tokens=4, n=3
    )
    assert len(chat.choices) == 3 and chat.usage.completion_tokens <= 12


def test_stop_sequences_end_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="base", prompt="Hello", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()
                 and text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("the random micro model produced no printable text to stop on")
    cut = client.completions.create(model="base", prompt="Hello", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_models_lists_auto_base_and_every_adapter(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[:2] == ["auto", "base"]
    assert {"math", "cooking", "travel"} <= set(ids)


def test_embeddings_through_the_client(client: openai.OpenAI) -> None:
    default = client.embeddings.create(input=["What is 2 plus 2?", "Bake bread"], model="any")
    assert len(default.data) == 2 and default.usage.prompt_tokens > 0
    vector = default.data[0].embedding
    assert len(vector) == 384 and sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)
    floats = client.embeddings.create(input="What is 2 plus 2?", model="any",
                                      encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vector, abs=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "neuro", "twin"])
def test_merge_method_per_request_is_cached(client: openai.OpenAI, method: str) -> None:
    merge = {"method": method, "rank": 8}
    body = {"merge": merge, "routing": {"top_k": 2}}
    first, _ = _chat(client, MATH, extra_body=body, temperature=0)
    again, _ = _chat(client, MATH, extra_body=body, temperature=0)
    assert first.routing["method"] == again.routing["method"] == method
    assert len(first.routing["adapters"]) == 2
    assert again.routing["cache_hit"] is True
    assert again.choices[0].message.content == first.choices[0].message.content
