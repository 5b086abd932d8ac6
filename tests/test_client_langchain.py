"""langchain-openai, a client people use, against a live server on loopback: ChatOpenAI
invoke, stream and batch, and OpenAIEmbeddings on /v1/embeddings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from server import LiveServer

from app.engine.engine import Engine
from app.main import create_app


@pytest.fixture(scope="module")
def url(micro_engine: Engine) -> Iterator[str]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield f"{live.url}/v1"


def _chat(url: str, model: str = "auto", **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=url, api_key="unused", max_retries=0,
                      temperature=0, max_tokens=8, **kwargs)


def test_chat_invoke_stream_and_batch_agree(url: str, micro_engine: Engine) -> None:
    llm = _chat(url)
    reply = llm.invoke("What is 2 plus 3?")
    assert reply.content and reply.usage_metadata["output_tokens"] <= 8
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    streamed = list(_chat(url, stream_usage=True).stream("What is 2 plus 3?"))
    assert "".join(chunk.content for chunk in streamed) == reply.content  # greedy: the same
    total = sum(streamed[1:], streamed[0])
    keys = ("input_tokens", "output_tokens", "total_tokens")  # (the second hits the cache)
    assert [total.usage_metadata[k] for k in keys] == [reply.usage_metadata[k] for k in keys]
    assert total.usage_metadata["input_token_details"]["cache_read"] > 0
    named = micro_engine.adapter_ids()[0]
    batch = _chat(url, named).batch(["Hi", "What is 2 plus 3?"])
    assert batch[1].content == _chat(url, named).invoke("What is 2 plus 3?").content


def test_chat_errors_surface_as_openai_errors(url: str) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        _chat(url, "no-such-adapter").invoke("Hi")


def test_embeddings_match_the_route(url: str, micro_engine: Engine) -> None:
    """check_embedding_ctx_length=False sends strings; the default tokenises with tiktoken
    and sends token arrays, which /v1/embeddings refuses with a 400 that says to send strings
    (tiktoken also needs its vocabulary from the internet, which tests cannot reach)."""
    embeddings = OpenAIEmbeddings(model="auto", base_url=url, api_key="unused",
                                  max_retries=0, check_embedding_ctx_length=False)
    texts = ["How many grams in a pound?", "A recipe for bread"]
    vectors = np.array(embeddings.embed_documents(texts))
    direct, _ = micro_engine.embed(texts)
    assert vectors.shape == (2, micro_engine.embedding_dim)
    np.testing.assert_allclose(vectors, direct, atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(texts[0]), direct[0], atol=1e-6)


def test_structured_output_in_json_mode(url: str) -> None:
    """with_structured_output(method="json_mode") sends response_format json_object and parses
    the reply; the server's constraint makes it JSON (the micro model's object may be empty)."""
    llm = _chat(url, "base").model_copy(update={"max_tokens": 200})
    parsed = llm.with_structured_output(None, method="json_mode").invoke(
        "Reply with a JSON object.")
    assert isinstance(parsed, dict)
