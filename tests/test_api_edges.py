"""OpenAI API edges found by real clients (issue #19), driven by the official `openai` client
against a live server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server import LiveServer

from app.engine.engine import Engine
from app.main import create_app


@pytest.fixture(scope="module")
def client(micro_engine: Engine) -> Iterator[openai.OpenAI]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_retrieve_model_by_id(client: openai.OpenAI) -> None:
    for model in client.models.list().data:
        card = client.models.retrieve(model.id)
        assert (card.id, card.object) == (model.id, "model")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_null_means_the_default_for_nullable_fields(client: openai.OpenAI) -> None:
    nulls = {"n": None, "stream": None, "echo": None}
    done = client.completions.create(model="base", prompt="Hello", max_tokens=2,
                                     extra_body=nulls)
    assert len(done.choices) == 1 and done.usage.completion_tokens <= 2
    chat = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"n": None, "stream": None, "stream_options": {"include_usage": None}})
    assert len(chat.choices) == 1


def test_embeddings_refuse_empty_input(client: openai.OpenAI) -> None:
    for bad in ("", ["fine", ""]):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="auto", input=bad)
        assert err.value.body["param"] == "input"


def test_embeddings_refuse_token_arrays_saying_to_send_strings(client: openai.OpenAI) -> None:
    for tokens in ([104, 101, 108], [[104, 101], [108]]):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="auto", input=tokens)
        assert err.value.body["param"] == "input"
        assert "send the input as strings" in err.value.body["message"]
    assert client.embeddings.create(model="auto", input=["fine"]).data[0].embedding


def test_token_id_prompts_complete_like_their_text(client: openai.OpenAI,
                                                   micro_engine: Engine) -> None:
    text = "The capital of France is"
    ids = micro_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    greedy = {"model": "auto", "max_tokens": 4, "temperature": 0}
    by_text = client.completions.create(prompt=text, **greedy)
    by_ids = client.completions.create(prompt=ids, **greedy)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.model_extra["routing"] == by_text.model_extra["routing"]  # routed on the text
    two = client.completions.create(prompt=[ids, ids[:2]], **greedy)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == by_text.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=[micro_engine.vocab_size], **greedy)
    assert err.value.body["param"] == "prompt"


def test_streamed_chunks_count_what_usage_counts_with_ignore_eos(
    client: openai.OpenAI, micro_engine: Engine
) -> None:
    """Special tokens generated past the end-of-turn marker (ignore_eos) have no text; each
    still gets its chunk (empty content), so a streaming client counts usage's tokens."""
    eos = min(micro_engine.eos_ids)
    assert micro_engine.tokenizer.decode([eos], skip_special_tokens=True) == ""
    for model in ("base", micro_engine.adapter_ids()[0]):
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
            stream=True, stream_options={"include_usage": True},
            logit_bias={str(eos): 100}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        usage = chunks[-1].usage
        tokens = [c for c in chunks[1:-1] if c.choices]  # after the role chunk, before usage
        assert usage.completion_tokens == 6 == len(tokens)
        assert "".join(c.choices[0].delta.content or "" for c in tokens) == ""
        assert tokens[-1].choices[0].finish_reason == "length"
    plain = client.completions.create(model="base", prompt="Hello", max_tokens=5, stream=True,
                                      stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True})
    chunks = list(plain)
    assert len([c for c in chunks if c.choices]) == chunks[-1].usage.completion_tokens == 5
