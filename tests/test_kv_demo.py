"""Exactness of the KV cache on the real demo zoo: greedy outputs with prefix reuse on are,
token for token, those with it off (routed, named, base and a blend; single and multi-turn;
rows joining every step while others decode), and logprobs agree within LOGPROB_ATOL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from app.engine.blend import AUTO_MODEL, blend_for
from app.engine.engine import Engine, _rounded
from app.engine.kv_pool import pool_for
from app.engine.prefix_cache import PrefixCache
from app.engine.scheduler import Scheduler
from app.settings import DEMO_STORE, Settings
from tests.engine_harness import Harness

LOGPROB_ATOL = 1e-3  # fp32: a reused prefix and a recomputed one differ by summation order
TASKS = ["arithmetic", "json_extract", "reverse_words", "sentiment", "spell", "unit_convert"]


@pytest.fixture(scope="module")
def demo_engine() -> Iterator[Engine]:
    engine = Engine(Settings())
    engine.load(show_progress=False)
    yield engine
    engine.shutdown()


def _eval_prompt(task: str) -> str:
    line = (DEMO_STORE / task / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0]
    return json.loads(line)["prompt"]


def _harness(engine: Engine, cache_bytes: int) -> Harness:
    h = Harness(engine)
    s = h.scheduler
    h.scheduler = Scheduler(
        s.model, s.context, s.tokenizer, s.eos_ids, s.model_lock, s.max_batch_size,
        s.max_step_tokens, s.on_done, None, None, pool_for(engine.model, 8, 512),
        PrefixCache(cache_bytes, engine.settings.prefix_block_tokens),
    )
    return h


def _run(h: Harness, specs, staggered: bool) -> list[tuple[list[int], list[float], int]]:
    """Jobs for (text, blend, messages); staggered: one joins every step while the earlier
    ones decode. Returns each job's (token ids, logprobs, cached tokens)."""
    jobs = [h.job(text, blend=blend, messages=messages, max_tokens=8, logprobs=0)
            for text, blend, messages in specs]
    pending = list(jobs)
    for _ in range(1000):
        if pending:
            h.add(*(pending[:1] if staggered else pending))
            pending = pending[1:] if staggered else []
        elif not h.scheduler._actionable():
            break
        h.scheduler.step()
    out = []
    for job in jobs:
        events = h.events(job)
        final = [e for e in events if e.finish_reason is not None]
        assert len(final) == 1 and final[0].finish_reason in ("stop", "length"), final
        out.append(([t for e in events for t in e.token_ids],
                    [lp.logprob for e in events for lp in e.logprobs], final[0].cached_tokens))
    return out


@pytest.mark.slow
def test_demo_outputs_with_the_cache_on_are_those_with_it_off(demo_engine):
    engine = demo_engine
    texts = [_eval_prompt(t) for t in TASKS]

    def routed(text: str) -> tuple[tuple[str, float], ...]:
        decision = engine.route(text)
        return _rounded(blend_for(AUTO_MODEL, decision, engine.settings.fallback_adapter),
                        engine.settings.blend_weight_step)

    blends = {"routed": None, "spell": (("spell", 1.0),), "base": (),
              "blend": (("arithmetic", 0.5), ("unit_convert", 0.5))}
    first = [(text, routed(text) if name == "routed" else blend, None)
             for text in texts[:3] for name, blend in blends.items()]
    first += [(text, routed(text), None) for text in texts[3:]]

    def conversation(h: Harness, cache: int) -> list[tuple[list[int], list[float], int]]:
        one = _run(h, first, staggered=True)
        # A second turn of three routed conversations: history (prompt, reply), a question.
        second = []
        for (text, blend, _), (ids, _, _) in list(zip(first, one, strict=True))[:12:4]:
            messages = [{"role": "user", "content": text},
                        {"role": "assistant", "content": engine.tokenizer.decode(ids)},
                        {"role": "user", "content": "Say it again, briefly."}]
            second.append((text, blend, messages))
        two = _run(h, second, staggered=True)
        again = _run(h, first[:6], staggered=False) if cache else []
        return one + two + again

    off = conversation(_harness(engine, 0), 0)
    on = conversation(_harness(engine, 256 << 20), 1)
    n_first, n_second = len(first), 3
    # The repeat under the cache is compared with the cold run of the same prompts.
    expected = off + off[:6]
    for i, ((ids_off, lp_off, c_off), (ids_on, lp_on, _)) in enumerate(
            zip(expected, on, strict=True)):
        assert c_off == 0
        assert ids_on == ids_off, i
        torch.testing.assert_close(torch.tensor(lp_on), torch.tensor(lp_off), rtol=0,
                                   atol=LOGPROB_ATOL)
    cached = [c for _, _, c in on]
    # Later turns start from the previous turn's states; repeats from their own prompt's.
    assert all(c > 0 for c in cached[n_first:n_first + n_second])
    assert all(c > 0 for c in cached[n_first + n_second:])
