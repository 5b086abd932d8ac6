"""The OpenAI fields users send: each honoured (logprobs, penalties, logit_bias, JSON mode,
roles, user) or refused with a 400 naming it, on a live server with the micro zoo."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator

import httpx
import openai
import pytest
from server import LiveServer

from adapters.merge import MERGE_METHODS, MergeParameterError
from app.engine.engine import Engine
from app.engine.json_constraint import is_json_prefix
from app.main import create_app
from app.protocol import MERGE_REQUEST_MODELS

HI = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _chat(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/chat/completions",
                     json={"model": "base", "messages": HI, "max_tokens": 8, **fields})


def _complete(http: httpx.Client, **fields: object) -> dict:
    response = http.post("/v1/completions", json={
        "model": "base", "prompt": "Hello", "temperature": 0, "max_tokens": 8, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


# --- logprobs -----------------------------------------------------------------------------
def test_chat_logprobs_are_sorted_log_probabilities_with_the_greedy_token_first(
    http: httpx.Client,
) -> None:
    body = _chat(http, logprobs=True, top_logprobs=5, temperature=0).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 5 and top == sorted(top, reverse=True) and all(v <= 0 for v in top)
        assert sum(math.exp(v) for v in top) <= 1 + 1e-6
        # Greedy without processors picks the argmax: the best alternative is the token.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    no_top = _chat(http, logprobs=True, temperature=0).json()["choices"][0]["logprobs"]
    assert [e["token"] for e in no_top["content"]] == [e["token"] for e in content]
    assert all(e["top_logprobs"] == [] for e in no_top["content"])
    assert _chat(http, temperature=0).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_stream_per_chunk_and_parse_in_the_client(
    http: httpx.Client, server: LiveServer
) -> None:
    whole = _chat(http, logprobs=True, top_logprobs=2, temperature=0).json()
    expected = [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="base", messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
        stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == expected
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    parsed = client.chat.completions.create(model="base", messages=HI, max_tokens=4,
                                            logprobs=True, top_logprobs=3)
    assert len(parsed.choices[0].logprobs.content[0].top_logprobs) == 3


def test_completion_logprobs_have_tokens_offsets_and_top_alternatives(
    http: httpx.Client,
) -> None:
    choice = _complete(http, logprobs=3, max_tokens=10)
    logprobs = choice["logprobs"]
    tokens = logprobs["tokens"]
    assert len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) > 0
    assert logprobs["text_offset"][0] == 0
    for i, token in enumerate(tokens[:-1]):
        assert logprobs["text_offset"][i + 1] - logprobs["text_offset"][i] == len(token)
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen)  # greedy: the chosen is the best
    streamed = []
    with http.stream("POST", "/v1/completions", json={
        "model": "base", "prompt": "Hello", "temperature": 0, "max_tokens": 10, "logprobs": 3,
        "stream": True,
    }) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line.removeprefix("data: "))["choices"]:
                    if c.get("logprobs"):
                        streamed.append(c["logprobs"])
    assert [t for s in streamed for t in s["tokens"]] == tokens
    assert [o for s in streamed for o in s["text_offset"]] == logprobs["text_offset"]


def test_logprob_bounds_are_400(http: httpx.Client) -> None:
    _refused(_chat(http, top_logprobs=2), "top_logprobs")
    _refused(_chat(http, logprobs=False, top_logprobs=2), "top_logprobs")
    _refused(_chat(http, logprobs=True, top_logprobs=21), "top_logprobs")
    for fields, param in [({"logprobs": 6}, "logprobs"), ({"echo": "yes"}, "echo")]:
        _refused(http.post("/v1/completions", json={"model": "base", "prompt": "Hi", **fields}),
                 param)


# --- logit_bias and penalties -------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens_under_greedy(
    http: httpx.Client, micro_engine: Engine
) -> None:
    (forced,) = micro_engine.tokenizer("b", add_special_tokens=False)["input_ids"]
    choice = _complete(http, logit_bias={str(forced): 100}, max_tokens=5, logprobs=0)
    assert choice["logprobs"]["tokens"] == ["b"] * 5 and choice["text"] == "bbbbb"

    baseline = _complete(http, max_tokens=1, logprobs=0)["logprobs"]["tokens"][0]
    texts = micro_engine.token_strings(range(micro_engine.vocab_size))
    ids = [t for t, text in enumerate(texts) if text == baseline]  # all ids of that text
    assert ids
    banned = _complete(http, max_tokens=1, logprobs=0,
                       logit_bias={str(t): -100 for t in ids})
    assert banned["logprobs"]["tokens"][0] != baseline


def test_logit_bias_bad_keys_and_values_are_400_on_logit_bias(http: httpx.Client) -> None:
    for bias in ({"abc": 1}, {"-1": 1}, {"5": 101}, {"5": "high"}, {"100000": 1}):
        response = _chat(http, logit_bias=bias)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "logit_bias", bias
    assert _chat(http, logit_bias={"5": 101}).status_code == 400  # out of range: a bad value
    assert _chat(http, logit_bias={"100000": 1}).status_code == 400  # beyond the vocabulary


def test_penalties_change_repetition_in_their_direction(http: httpx.Client) -> None:
    def distinct(**penalty: float) -> int:
        tokens = _complete(http, max_tokens=30, logprobs=0, ignore_eos=True,
                           **penalty)["logprobs"]["tokens"]
        assert len(tokens) == 30
        return len(set(tokens))

    plain = distinct()
    assert distinct(frequency_penalty=2.0) > plain > distinct(presence_penalty=-2.0)
    assert distinct(presence_penalty=2.0) > plain
    _refused(_chat(http, presence_penalty=2.5), "presence_penalty")
    _refused(_chat(http, frequency_penalty=-3), "frequency_penalty")


# --- JSON mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_json_object_output_is_json(http: httpx.Client, sampling: dict) -> None:
    body = _chat(http, response_format={"type": "json_object"}, max_tokens=64,
                 **sampling).json()
    choice = body["choices"][0]
    text = choice["message"]["content"]
    assert text.strip().startswith("{"), text  # the constraint made it begin an object
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may run out of tokens: what it wrote is still a valid prefix
        assert is_json_prefix(text)
    completion = _complete(http, response_format={"type": "json_object"}, max_tokens=48)
    assert completion["text"].strip().startswith("{") and is_json_prefix(completion["text"])


def test_response_format_text_is_plain_and_json_schema_is_refused(http: httpx.Client) -> None:
    plain = _chat(http, temperature=0).json()["choices"][0]["message"]["content"]
    text = _chat(http, temperature=0, response_format={"type": "text"}).json()
    assert text["choices"][0]["message"]["content"] == plain
    _refused(_chat(http, response_format={"type": "json_schema",
                                          "json_schema": {"name": "x", "schema": {}}}),
             "response_format")
    _refused(_chat(http, response_format={"type": "xml"}), "response_format.type")


# --- fields we cannot honour --------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [TOOL]), ("tool_choice", "auto"), ("tool_choice", "required"),
    ("functions", [TOOL["function"]]), ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("service_tier", "flex"), ("store", True), ("metadata", {"k": "v"}),
    ("reasoning_effort", "low"), ("verbosity", "low"), ("top_k", 5), ("min_p", 0.1),
    ("repetition_penalty", 1.2), ("guided_json", {"type": "object"}),
])
def test_fields_we_cannot_honour_are_400_naming_them(
    http: httpx.Client, field: str, value: object
) -> None:
    if field == "web_search_options":
        value = {"search_context_size": "low"}
    _refused(_chat(http, **{field: value}), field)


def test_completion_only_fields_are_refused(http: httpx.Client) -> None:
    for field, value in [("best_of", 3), ("suffix", "end")]:
        _refused(http.post("/v1/completions",
                           json={"model": "base", "prompt": "Hi", field: value}), field)
    both = http.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 2,
                                              "best_of": 2, "n": 2})
    assert both.status_code == 200 and len(both.json()["choices"]) == 2


def test_harmless_values_of_those_fields_are_accepted(http: httpx.Client) -> None:
    plain = _chat(http, temperature=0).json()["choices"][0]["message"]["content"]
    response = _chat(http, temperature=0, tool_choice="none", tools=[], functions=[],
                     parallel_tool_calls=True, service_tier="auto", store=False,
                     modalities=["text"], metadata={}, user="end-user-7")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == plain


def test_user_is_logged_with_the_request_id(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="app.api.runs"):
        response = _chat(http, user="end-user-42")
    assert response.status_code == 200
    rid = response.json()["id"]
    assert any(rid in r.getMessage() and "end-user-42" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# --- messages -----------------------------------------------------------------------------
def test_unknown_and_tool_roles_are_400(http: httpx.Client) -> None:
    for role in ("wizard", "tool", "function"):
        _refused(_chat(http, messages=[{"role": role, "content": "hi"}]), "messages.0.role")
    _refused(_chat(http, messages=[*HI, {"role": "assistant", "content": None,
                                          "tool_calls": [{"id": "1", "type": "function"}]}]),
             "messages.1.tool_calls")


def test_developer_is_system_and_text_parts_are_text(http: httpx.Client) -> None:
    def answer(messages: list[dict]) -> tuple[str, int]:
        body = _chat(http, messages=messages, temperature=0).json()
        return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]

    system = answer([{"role": "system", "content": "Be brief."}, *HI])
    assert answer([{"role": "developer", "content": "Be brief."}, *HI]) == system
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 2 "},
                                          {"type": "text", "text": "plus 3?"}]}]
    assert answer(parts) == answer(HI)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    _refused(_chat(http, messages=image), "messages.0.content")


# --- the merge models follow the registry -------------------------------------------------
_API_ONLY = {"method", "storage", "rank"}  # storage and rank: how the merge is stored


def test_merge_request_models_match_the_registry() -> None:
    assert set(MERGE_REQUEST_MODELS) == set(MERGE_METHODS)
    bounds = {"minimum": True, "maximum": True, "exclusiveMinimum": False,
              "exclusiveMaximum": False}  # keyword -> is the bound itself allowed
    checked = 0
    for name, model in MERGE_REQUEST_MODELS.items():
        params = {f.name for f in dataclasses.fields(MERGE_METHODS[name].params_type)}
        params.discard("rank")  # twin's own rank: `rank` is the storage rank in the API
        assert set(model.model_fields) - _API_ONLY == params, name
        for field, spec in model.model_json_schema()["properties"].items():
            if field in _API_ONLY:
                continue
            for branch in spec.get("anyOf", [spec]):
                for keyword, inside in bounds.items():
                    if keyword not in branch or (name, field, keyword) == (
                            "te", "n_bins", "maximum"):
                        continue  # the API's own cap on histogram bins (memory), not a rule
                    value = branch[keyword]
                    checked += 1
                    if inside:  # each bound the schema declares is the registry's too
                        MERGE_METHODS[name].params(**{field: value})
                    else:
                        with pytest.raises(MergeParameterError):
                            MERGE_METHODS[name].params(**{field: value})
    assert checked >= 8
