"""The engine's per-token log-probabilities as OpenAI's two shapes (chat and legacy completions).

Token texts come from `EngineClient.token_strings`: each token decoded alone, so a token that
ends inside a UTF-8 character reads as U+FFFD, as in OpenAI's own responses; `bytes` are the
token's raw bytes (`EngineClient.token_bytes`), so a client can join them into the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.engine.protocol import EngineClient
from app.engine.types import TokenEvent, TokenLogprob
from app.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0  # what OpenAI reports for a probability that underflows


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > FLOOR else FLOOR


def _ids(entries: Sequence[TokenLogprob]) -> list[int]:
    return sorted({e.token_id for e in entries} | {t for e in entries for t, _ in e.top})


def _names(engine: EngineClient, entries: Sequence[TokenLogprob]) -> dict[int, str]:
    ids = _ids(entries)
    return dict(zip(ids, engine.token_strings(ids), strict=True))


def chat_logprobs(engine: EngineClient, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    names = _names(engine, entries)
    ids = _ids(entries)
    raw = dict(zip(ids, engine.token_bytes(ids), strict=True))

    def one(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=names[token_id], logprob=_finite(logprob),
                          bytes=list(raw[token_id]))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**vars(one(e.token_id, e.logprob)),
                         top_logprobs=[one(t, lp) for t, lp in e.top])
        for e in entries
    ])


def completion_logprobs(
    engine: EngineClient, entries: Sequence[TokenLogprob], offset: int = 0
) -> CompletionLogprobs:
    """`offset`: where the first token starts in the choice's text (its earlier chunks)."""
    names = _names(engine, entries)
    tokens = [names[e.token_id] for e in entries]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_finite(e.logprob) for e in entries],
        top_logprobs=[{names[t]: _finite(lp) for t, lp in e.top} for e in entries],
        text_offset=_offsets(tokens, offset),
    )


def prompt_logprobs(engine: EngineClient, prompt: TokenEvent) -> CompletionLogprobs:
    """An echoed prompt's tokens (from the engine's prompt event): the first token has no
    logprob (null, as OpenAI and vLLM report it), the others their logprob under the blend."""
    rest = completion_logprobs(engine, prompt.prompt_logprobs, 0)
    first = engine.token_strings(prompt.prompt_ids[:1])
    tokens = first + rest.tokens
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None, *rest.token_logprobs],
        top_logprobs=[None, *rest.top_logprobs],
        text_offset=_offsets(tokens, 0),
    )


def joined(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    """Several parts of one choice (the echoed prompt, then the completion), offsets carried
    on: each part's offsets restart at 0."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += _offsets(part.tokens, offset)
        offset += sum(len(t) for t in part.tokens)
    return out


def _offsets(tokens: Sequence[str], offset: int) -> list[int]:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return offsets
