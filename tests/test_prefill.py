"""Batched and chunked prefill: a request's greedy output never depends on what it was
prefilled with, nor on how its prompt was cut into chunks; long prompts don't stall decoding."""

from __future__ import annotations

import pytest
from engine_harness import Harness, tokens_and_text

from adapters.zoo.micro import topic_prompts
from app import metrics

PROMPTS = [
    (topic_prompts("math", 1, 2000)[0], "math"),
    (topic_prompts("cooking", 1, 2001)[0] + " Please explain every step in detail.", "blend"),
    ("Hi", "base"),
    (topic_prompts("travel", 1, 2002)[0], "travel"),
    (topic_prompts("cooking", 1, 2003)[0], "cooking"),
    (topic_prompts("math", 1, 2004)[0] + " And then add seven.", "blend"),
]


def _alone(engine, text, mix, **kw) -> tuple[list[int], str, str | None]:
    harness = Harness(engine)
    job = harness.job(text, mix, **kw)
    harness.add(job)
    harness.run()
    return tokens_and_text(harness.events(job))


def _prefill_steps() -> float:
    return sum(s.value for s in metrics.PREFILL_TOKENS_PER_STEP.collect()[0].samples
               if s.name.endswith("_count"))


def test_prefilled_together_equals_prefilled_alone(micro_engine):
    alone = [_alone(micro_engine, t, m, ignore_eos=True) for t, m in PROMPTS]
    harness = Harness(micro_engine)
    jobs = [harness.job(t, m, ignore_eos=True) for t, m in PROMPTS]
    harness.add(*jobs)
    before = _prefill_steps()
    harness.scheduler.step()  # one step: every prompt prefilled in ONE forward pass
    assert _prefill_steps() == before + 1
    assert len(harness.scheduler.running) == len(jobs)
    harness.run()
    together = [tokens_and_text(harness.events(j)) for j in jobs]
    assert together == alone
    assert len({len(j.prompt_ids) for j in jobs}) > 3  # the prompts really differ in length
    assert all(harness.done[j.request.request_id] == 1 for j in jobs)


@pytest.mark.parametrize("budget", [16, 19, 23])
def test_chunked_prefill_equals_whole(micro_engine, budget):
    """A prompt cut into chunks of `budget` tokens (over several steps, beside other rows)
    gives the same tokens as the prompt prefilled at once."""
    text, mix = PROMPTS[1]
    whole = _alone(micro_engine, text, mix, ignore_eos=True)
    harness = Harness(micro_engine, max_step_tokens=budget)
    long_job = harness.job(text, mix, ignore_eos=True)
    assert len(long_job.prompt_ids) > 2 * budget  # at least three chunks
    others = [harness.job(t, m, ignore_eos=True) for t, m in PROMPTS[2:4]]
    harness.add(long_job, *others)
    harness.run()
    assert tokens_and_text(harness.events(long_job)) == whole
    for job, (t, m) in zip(others, PROMPTS[2:4], strict=True):
        assert tokens_and_text(harness.events(job)) == _alone(micro_engine, t, m,
                                                               ignore_eos=True)


def test_a_long_prompt_does_not_stall_running_streams(micro_engine):
    """With a small budget, a running row gets a token at every step while a long prompt is
    prefilled in chunks beside it."""
    harness = Harness(micro_engine, max_step_tokens=16)
    # logprobs=0: every token is an event, even one whose text is still held back.
    running = harness.job("Hi", "math", max_tokens=60, ignore_eos=True, logprobs=0)
    harness.add(running)
    harness.scheduler.step()  # "Hi" is prefilled and decoding
    harness.events(running)
    long_text = " ".join(topic_prompts("travel", 6, 3000))
    long_job = harness.job(long_text, "travel", max_tokens=4, ignore_eos=True)
    harness.add(long_job)
    steps = 0
    while not any(a.job is long_job for a in harness.scheduler.running):
        harness.scheduler.step()
        steps += 1
        assert len(harness.events(running)) == 1, "the running stream missed a step"
    assert steps >= len(long_job.prompt_ids) // 16  # it really took several chunks
    harness.run()


def test_budget_caps_prefill_tokens_per_step(micro_engine):
    harness = Harness(micro_engine, max_step_tokens=32)
    jobs = [harness.job(t, m, max_tokens=3) for t, m in PROMPTS]
    harness.add(*jobs)
    seen = []
    original = harness.scheduler._prefill_forward

    def spy(chosen):
        seen.append(sum(take for _, take in chosen))
        return original(chosen)

    harness.scheduler._prefill_forward = spy
    harness.run()
    assert seen and max(seen) <= 32
    assert sum(seen) == sum(len(j.prompt_ids) for j in jobs)
