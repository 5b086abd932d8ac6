"""litellm, a client people use, against a live server on loopback through its `openai/`
provider with api_base: completion, streaming, parallel acompletion, and how litellm maps the
server's error statuses (400, 404, 409, 429, 503) onto its exception classes.

litellm is a dev dependency pinned in the lock (1.110.2; its boto3 is why python-dateutil is
held at 2.9.0.post0).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from server import LiveServer

from app.engine.engine import Engine
from app.main import create_app

# Offline: the bundled model cost map instead of fetching it at import; no telemetry.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")
import litellm  # after the offline settings above: litellm reads them at import

QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def url(micro_engine: Engine) -> Iterator[str]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield f"{live.url}/v1"


def _kwargs(url: str, model: str = "auto", **extra: object) -> dict:
    return {"model": f"openai/{model}", "api_base": url, "api_key": "unused",
            "num_retries": 0, "temperature": 0, "max_tokens": 8, **extra}


def test_completion_and_stream_agree(url: str) -> None:
    reply = litellm.completion(messages=QUESTION, **_kwargs(url))
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0

    chunks = list(litellm.completion(messages=QUESTION, stream=True,
                                     stream_options={"include_usage": True}, **_kwargs(url)))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer
    usage = next(c.usage for c in reversed(chunks) if getattr(c, "usage", None))
    assert usage.completion_tokens == reply.usage.completion_tokens


def test_parallel_acompletion_matches_sequential(url: str, micro_engine: Engine) -> None:
    named = micro_engine.adapter_ids()[0]
    prompts = ["Hi", "What is 2 plus 3?", "How many grams in a pound?", "A recipe for bread"]

    async def ask_all() -> list:
        return await asyncio.gather(*(
            litellm.acompletion(messages=[{"role": "user", "content": p}], **_kwargs(url, m))
            for p in prompts for m in ("auto", named)))

    replies = asyncio.run(ask_all())
    assert len(replies) == 2 * len(prompts)
    one = litellm.completion(messages=[{"role": "user", "content": prompts[1]}],
                             **_kwargs(url, named))
    assert replies[3].choices[0].message.content == one.choices[0].message.content
    assert all(r.choices[0].message.content is not None for r in replies)


def test_errors_map_to_litellm_exceptions(url: str, micro_engine: Engine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(litellm.BadRequestError) as bad:  # the server's 400: chat needs >= 1
        litellm.completion(messages=QUESTION, **_kwargs(url, max_tokens=0))
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)
    with pytest.raises(litellm.NotFoundError) as missing:
        litellm.completion(messages=QUESTION, **_kwargs(url, "no-such-adapter"))
    assert missing.value.status_code == 404 and "does not exist" in str(missing.value)

    # 409, an adapter in the store that was refused (as a DoRA one is): litellm has no class
    # for it and raises its generic APIError, keeping the status and the server's message
    monkeypatch.setitem(micro_engine.store.refused, "refused-here", "refused for the test")
    with pytest.raises(litellm.APIError) as conflict:
        litellm.completion(messages=QUESTION, **_kwargs(url, "refused-here"))
    assert type(conflict.value) is litellm.APIError and conflict.value.status_code == 409
    assert "refused for the test" in str(conflict.value)

    # 429: no room in the queue
    monkeypatch.setattr(micro_engine, "settings",
                        micro_engine.settings.model_copy(update={"max_queue": 0}))
    with pytest.raises(litellm.RateLimitError):
        litellm.completion(messages=QUESTION, **_kwargs(url))
    monkeypatch.undo()

    # 503: draining (what SIGTERM does)
    monkeypatch.setattr(micro_engine, "draining", True)
    with pytest.raises(litellm.ServiceUnavailableError):
        litellm.completion(messages=QUESTION, **_kwargs(url))
    monkeypatch.undo()
    assert litellm.completion(messages=QUESTION, **_kwargs(url)).choices[0].message.content
