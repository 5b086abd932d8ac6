"""KV slots and the prefix cache: rows join and leave without moving anyone's states; a prefix
is reused only under its own blend; outputs with the cache on are those with it off."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch

from adapters.zoo.micro import topic_prompts
from app import metrics
from app.engine.engine import Engine, _rounded
from app.engine.kv_pool import pool_for
from app.engine.prefix_cache import PrefixCache, blend_key
from app.engine.scheduler import Scheduler
from app.main import create_app
from tests.engine_harness import Harness
from tests.server import LiveServer

LOGPROB_ATOL = 1e-3  # fp32: a reused prefix and a recomputed one differ by summation order

# Same question under every kind of mix, interleaved: base, each adapter alone, blends.
MIX_ORDER = ["base", "math", "blend", "travel", "cooking", "base", "blend", "math"]


def _prompts() -> list[str]:
    return [topic_prompts(t, 1, 2000 + i)[0] for i, t in
            enumerate(["math", "cooking", "travel"])]


def _harness(engine: Engine, cache_bytes: int, slots: int = 16, **kwargs) -> Harness:
    h = Harness(engine, **kwargs)
    s = h.scheduler
    h.scheduler = Scheduler(
        s.model, s.context, s.tokenizer, s.eos_ids, s.model_lock, s.max_batch_size,
        s.max_step_tokens, s.on_done, None, None, pool_for(engine.model, slots, 512),
        PrefixCache(cache_bytes, block=4),
    )
    return h


def _outcome(h: Harness, job) -> tuple[list[int], list[float], int]:
    events = h.events(job)
    ids = [t for e in events for t in e.token_ids]
    logprobs = [lp.logprob for e in events for lp in e.logprobs]
    final = [e for e in events if e.finish_reason is not None]
    assert len(final) == 1 and final[0].finish_reason in ("stop", "length"), final
    return ids, logprobs, final[0].cached_tokens


def _run_all(h: Harness, specs, one_by_one: bool) -> list[tuple[list[int], list[float], int]]:
    jobs = [h.job(text, mix, max_tokens=8, logprobs=0) for text, mix in specs]
    if one_by_one:
        for job in jobs:
            h.add(job)
            h.run()
    else:
        h.add(*jobs)
        h.run()
    return [_outcome(h, j) for j in jobs]


def test_cache_on_matches_cache_off_and_never_crosses_blends(micro_engine):
    """Same prompt as base, each adapter and blends, interleaved: outputs token for token
    those without a cache; a prefix is reused only under the blend that made it."""
    specs = [(text, mix) for text in _prompts()[:2] for mix in MIX_ORDER]
    off = _run_all(_harness(micro_engine, 0), specs, one_by_one=True)
    on = _run_all(_harness(micro_engine, 64 << 20), specs, one_by_one=True)
    seen: set[tuple[str, str]] = set()
    for (text, mix), (ids_off, lp_off, c_off), (ids_on, lp_on, c_on) in zip(specs, off, on,
                                                                           strict=True):
        assert c_off == 0
        assert ids_on == ids_off, (text, mix)
        torch.testing.assert_close(torch.tensor(lp_on), torch.tensor(lp_off), rtol=0,
                                   atol=LOGPROB_ATOL)
        # The template's system prompt is shared by every prompt under one mix; the first
        # request of a mix reuses nothing cached under other mixes.
        first_of_mix = all(m != mix for _, m in seen)
        if first_of_mix:
            assert c_on == 0, f"{mix} reused a prefix cached under another blend"
        else:
            assert c_on > 0
        seen.add((text, mix))


def test_multi_turn_reuses_the_previous_turn(micro_engine):
    """Each turn resends the conversation so far (prompt and generated token ids, as a client
    sending token ids does): its states come from the cache, and the replies are those of a
    cold cache."""
    engine = micro_engine
    results = {}
    for cache in (0, 64 << 20):
        h = _harness(engine, cache)
        ids = h.job(_prompts()[0], "blend").prompt_ids
        turns = []
        for question in ["And why?", "Say it shorter.", "Thanks."]:
            job = h.job("", "blend", max_tokens=8, logprobs=0)
            job.prompt_ids = list(ids)
            h.add(job)
            h.run()
            out, lps, cached = _outcome(h, job)
            turns.append((out, lps, cached, len(ids)))
            ids = ids + out + engine.tokenizer(f"\n{question}\n",
                                               add_special_tokens=False)["input_ids"]
        results[cache] = turns
    for (ids_off, lp_off, _, _), (ids_on, lp_on, _, _) in zip(results[0], results[64 << 20],
                                                               strict=True):
        assert ids_on == ids_off
        torch.testing.assert_close(torch.tensor(lp_on), torch.tensor(lp_off), rtol=0,
                                   atol=LOGPROB_ATOL)
    for before, after in zip(results[64 << 20], results[64 << 20][1:], strict=False):
        out, _, _, prompt = before
        # The previous turn's prompt and reply (less its last token, never fed back), in
        # whole blocks of 4.
        assert after[2] >= (prompt + len(out) - 1) // 4 * 4


def test_rows_join_and_leave_without_copying_other_rows(micro_engine):
    """Rows join every step while others decode: each step copies only the joining row's
    prompt into its slot; the other rows' states stay where they are, bit for bit."""
    h = _harness(micro_engine, 0, max_step_tokens=4096)
    pool = h.scheduler.pool
    buffers = [layer.pool_k.data_ptr() for layer in pool.layers]
    texts = (_prompts() * 3)[:8]
    mixes = ["blend", "base", "math", "travel"]
    jobs = [h.job(t, mixes[i % 4], max_tokens=6 + i) for i, t in enumerate(texts)]
    expected = []
    pending = list(jobs)
    steps = 0
    while pending or h.scheduler._actionable():
        if pending:
            h.add(pending.pop(0))  # one joins every step
        before = [(a, a.slot, [(k.clone(), v.clone())
                               for k, v in pool.read(a.slot, pool.lens[a.slot])])
                  for a in h.scheduler.running]
        copied = pool.copied_tokens
        candidates = list(h.scheduler.waiting) + [a.job for a in h.scheduler.prefilling]
        h.scheduler.step()
        steps += 1
        running = {a.job for a in h.scheduler.running}
        joined = [j for j in candidates if j in running or j.finished]
        assert pool.copied_tokens - copied == sum(len(j.prompt_ids) for j in joined)
        for active, slot, layers in before:
            if active not in h.scheduler.running:
                continue  # it left this step (its slot may hold a new row already)
            assert active.slot == slot
            now = pool.read(slot, layers[0][0].shape[1])
            for (k0, v0), (k1, v1) in zip(layers, now, strict=True):
                assert torch.equal(k0, k1) and torch.equal(v0, v1)
        assert [layer.pool_k.data_ptr() for layer in pool.layers] == buffers
        assert steps < 500
    for job in jobs:
        expected.append(_outcome(h, job)[0])
    # Each output is the one it gets alone.
    for job, ids in zip(jobs, expected, strict=True):
        alone = h.job(job.request.route_text, _mix_of(job), max_tokens=job.request.sampling
                      .max_tokens)
        h.add(alone)
        h.run()
        assert _outcome(h, alone)[0] == ids


def _mix_of(job) -> str:
    from tests.engine_harness import MIXES
    return next(name for name, mix in MIXES.items() if mix == job.stream.admission.blend)


def test_a_full_pool_makes_rows_wait_and_corrupts_nobody(micro_engine):
    h_small = _harness(micro_engine, 0, slots=2)
    h_big = _harness(micro_engine, 0, slots=16)
    specs = [(text, mix) for text in _prompts() for mix in ("blend", "base")]
    most = 0
    jobs = [h_small.job(t, m, max_tokens=8, logprobs=0) for t, m in specs]
    h_small.add(*jobs)
    while h_small.scheduler._actionable():
        h_small.scheduler.step()
        most = max(most, h_small.scheduler.active)
        assert h_small.scheduler.pool.in_use <= 2
    assert most == 2
    small = [_outcome(h_small, j)[0] for j in jobs]
    big = [o[0] for o in _run_all(h_big, specs, one_by_one=False)]
    assert small == big
    assert h_small.scheduler.pool.in_use == 0


def test_prefix_cache_evicts_lru_in_bytes_keeping_chain_heads():
    cache = PrefixCache(capacity_bytes=0, block=2)
    states = [(torch.randn(2, 8, 4), torch.randn(2, 8, 4))]  # one layer, 8 tokens
    block_bytes = 2 * 2 * 2 * 4 * 4
    cache.capacity_bytes = 5 * block_bytes
    evicted = metrics.PREFIX_CACHE_EVICTIONS._value.get()
    cache.insert("a", list(range(8)), states)  # 4 blocks
    cache.insert("b", list(range(8)), states)  # 4 more: 3 evicted, the ends of chain "a"
    assert cache.bytes_used <= cache.capacity_bytes
    assert metrics.PREFIX_CACHE_EVICTIONS._value.get() - evicted == 3
    hit = cache.lookup("a", list(range(8)), 8)
    assert hit is not None and hit[0][0].shape[2] == 2  # chain "a" keeps its first block
    torch.testing.assert_close(hit[0][0][0], states[0][0][:, :2], rtol=0, atol=0)
    full = cache.lookup("b", list(range(8)), 8)
    assert full is not None and full[0][0].shape[2] == 8
    assert cache.lookup("b", list(range(8)), 5)[0][0].shape[2] == 4  # whole blocks only
    assert cache.lookup("c", list(range(8)), 8) is None  # another blend: nothing
    assert cache.lookup("b", [0, 1, 9, 9], 4)[0][0].shape[2] == 2  # diverges in block 2
    cache.forget_all()
    assert cache.lookup("b", list(range(8)), 8) is None


def test_blend_keys_and_rounding():
    assert blend_key("linear", (("a", 0.5),)) != blend_key("linear", (("a", 0.5000001),))
    assert blend_key("linear", ()) != blend_key("linear", (("a", 1.0),))
    assert _rounded((("a", 0.70049), ("b", 0.29951), ("c", 0.0004)), 0.001) == (
        ("a", 0.7), ("b", 0.3))
    assert _rounded((("a", 0.123456),), 0) == (("a", 0.123456),)


@pytest.fixture(scope="module")
def client(micro_engine: Engine) -> Iterator[openai.OpenAI]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_cached_tokens_in_usage_chat_completions_and_streams(client, micro_engine):
    system = "You are a careful assistant. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="math", messages=messages, max_tokens=3,
                                           temperature=0)
    again = client.chat.completions.create(model="math", messages=messages, max_tokens=3,
                                           temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    base = client.chat.completions.create(model="base", messages=messages, max_tokens=3)
    assert base.usage.prompt_tokens_details.cached_tokens == 0  # another blend
    chunks = list(client.chat.completions.create(
        model="math", messages=messages, max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    prompt = system + " Tell me."
    client.completions.create(model="travel", prompt=prompt, max_tokens=2)
    done = client.completions.create(model="travel", prompt=prompt, max_tokens=2)
    assert done.usage.prompt_tokens_details.cached_tokens > 0


def test_routing_reports_the_rounded_weights_it_blends(client, micro_engine):
    messages = [{"role": "user", "content": _prompts()[1]}]
    exact = client.chat.completions.create(model="auto", messages=messages, max_tokens=2)
    micro_engine.settings.blend_weight_step = 0.1  # the session's engine: restored below
    try:
        routed = client.chat.completions.create(model="auto", messages=messages, max_tokens=2)
    finally:
        micro_engine.settings.blend_weight_step = 0.0
    weights = {a["id"]: a["weight"] for a in routed.model_extra["routing"]["adapters"]}
    exact_weights = {a["id"]: a["weight"] for a in exact.model_extra["routing"]["adapters"]}
    assert weights == {a: round(round(w / 0.1) * 0.1, 12) for a, w in exact_weights.items()
                       if round(w / 0.1) != 0}
    assert weights != exact_weights  # the micro router's weights are not multiples of 0.1


def _kv_tokens_held(s: Scheduler) -> int:
    """Tokens whose states the scheduler holds for its rows: running rows' slot contents and
    prompts' states while they are prefilled (each such row has its slot reserved)."""
    running = sum(s.pool.lens[a.slot] for a in s.running)
    prefilling = sum(int(a.cache.mask.sum()) for a in s.prefilling if a.cache is not None)
    return running + prefilling


def test_soak_of_mixed_prompts_stays_within_the_pool_and_prefix_budgets(micro_engine):
    """Long and short prompts under several mixes, more than the pool holds, rows joining and
    leaving, a prefix cache small enough to evict all along: at every step the rows' KV fits
    the pool (slots x slot tokens), the prefix cache its bytes (counted from its tensors), the
    buffers are never reallocated; outputs are those of a run without any cache."""
    long_system = "Answer as the shop's assistant: be brief, polite and exact. " * 4
    texts = _prompts()
    specs = []
    for i in range(18):
        text = texts[i % 3]
        messages = ([{"role": "system", "content": long_system}] if i % 3 == 0 else []) + [
            {"role": "user", "content": text}]
        specs.append((text, ("blend", "base", "math")[i % 3 if i % 2 else 0], messages))
    slots, slot_tokens = 3, 256

    def soak(cache_bytes: int) -> tuple[list[list[int]], int]:
        h = _harness(micro_engine, cache_bytes, slots=slots, max_step_tokens=64)
        h.scheduler.pool = pool_for(micro_engine.model, slots, slot_tokens)
        pool, prefix = h.scheduler.pool, h.scheduler.prefix
        buffers = [layer.pool_k.data_ptr() for layer in pool.layers]
        jobs = [h.job(t, m, max_tokens=4 + i % 9, messages=msgs)
                for i, (t, m, msgs) in enumerate(specs)]
        assert max(len(j.prompt_ids) for j in jobs) > 128 > min(len(j.prompt_ids) for j in jobs)
        pending = list(jobs)
        for _ in range(2000):
            if pending:
                h.add(*pending[:2])  # two arrive every step: the pool is over-asked
                pending = pending[2:]
            elif not h.scheduler._actionable():
                break
            h.scheduler.step()
            assert pool.in_use <= slots and all(n <= slot_tokens for n in pool.lens)
            assert _kv_tokens_held(h.scheduler) * pool.token_bytes <= pool.capacity_bytes
            held = sum(e.numel() * e.element_size() for e in prefix._blocks.values())
            assert held == prefix.bytes_used <= prefix.capacity_bytes
            assert [layer.pool_k.data_ptr() for layer in pool.layers] == buffers
        else:
            raise AssertionError("the soak did not finish")
        assert pool.in_use == 0
        outcomes = [_outcome(h, j) for j in jobs]
        return [o[0] for o in outcomes], sum(o[2] for o in outcomes)

    evictions = metrics.PREFIX_CACHE_EVICTIONS._value.get()
    token_bytes = pool_for(micro_engine.model, 1, 1).token_bytes
    on, cached = soak(40 * token_bytes)  # 10 blocks of 4 tokens
    assert metrics.PREFIX_CACHE_EVICTIONS._value.get() > evictions  # the eviction path ran
    assert cached > 0  # and prefixes were reused between evictions
    off, none = soak(0)
    assert none == 0 and on == off
