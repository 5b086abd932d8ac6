"""A real `Scheduler` on the micro engine's model, stepped by the test itself.

The shared engine's own worker keeps running beside it (both take the model lock per
forward pass); stepping by hand lets a test decide which requests share a step, and see
every finish and every event.
"""

from __future__ import annotations

import time
from collections import Counter

from app.engine.engine import Engine
from app.engine.scheduler import Job, Scheduler
from app.engine.stream import GenerationStream
from app.engine.types import Admission, GenerationRequest, SamplingParams, TokenEvent

MIXES = {
    "math": (("math", 1.0),),
    "blend": (("math", 0.6), ("cooking", 0.3), ("travel", 0.1)),
    "cooking": (("cooking", 0.9), ("travel", 0.1)),
    "base": (),
    "travel": (("travel", 1.0),),
}


class Harness:
    """Jobs built by hand, a scheduler stepped by hand, and a ledger of finishes."""

    def __init__(self, engine: Engine, max_step_tokens: int = 4096, max_batch_size: int = 16,
                 constraint_for=None) -> None:
        self.engine = engine
        self.done: Counter[str] = Counter()  # request id -> on_done calls
        self.scheduler = Scheduler(
            engine.model, engine.context, engine.tokenizer, engine.eos_ids, engine.model_lock,
            max_batch_size, max_step_tokens, self._on_done, constraint_for,
        )
        self.jobs: list[Job] = []

    def _on_done(self, job: Job) -> None:
        self.done[job.request.request_id] += 1

    def job(self, text: str, mix: str = "blend", max_tokens: int = 12,
            messages: list[dict[str, str]] | None = None,
            blend: tuple[tuple[str, float], ...] | None = None, **sampling) -> Job:
        """A greedy job on `text` (or on the conversation `messages`) under `mix` (or under
        `blend`, adapter ids and weights, when given)."""
        engine = self.engine
        prompt = engine.render_chat(messages or [{"role": "user", "content": text}])
        request = GenerationRequest(
            prompt=prompt, route_text=text, model="auto",
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
        )
        blend = MIXES[mix] if blend is None else blend
        rows = [(_resident_slot(engine, a), w) for a, w in blend]
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        job = Job(request, ids, GenerationStream(Admission(request.request_id, None, blend,
                                                           len(ids)), None),
                  time.perf_counter(), rows=rows, placed=True)
        self.jobs.append(job)
        return job

    def add(self, *jobs: Job) -> None:
        self.scheduler.waiting.extend(jobs)

    def run(self, max_steps: int = 10_000) -> None:
        """Step until every job the scheduler holds has finished."""
        for _ in range(max_steps):
            if not self.scheduler._actionable():
                return
            self.scheduler.step()
        raise AssertionError("the scheduler did not finish its jobs")

    @staticmethod
    def events(job: Job) -> list[TokenEvent]:
        out = []
        while not job.stream._sync.empty():
            out.append(job.stream._sync.get_nowait())
        return out


def _resident_slot(engine: Engine, adapter_id: str) -> int:
    """The adapter's device slot, placing it with a request first if it is not resident."""
    slot = engine.slots.slot_of(adapter_id)
    if slot is None:
        prompt = engine.render_chat([{"role": "user", "content": "Hi"}])
        engine.submit(GenerationRequest(prompt, "Hi", model=adapter_id,
                                        sampling=SamplingParams(max_tokens=1))).result()
        slot = engine.slots.slot_of(adapter_id)
    assert slot is not None
    return slot


def tokens_and_text(events: list[TokenEvent]) -> tuple[list[int], str, str | None]:
    ids = [t for e in events for t in e.token_ids]
    finals = [e.finish_reason for e in events if e.finish_reason is not None]
    assert len(finals) == 1, f"expected one final event, got {finals}"
    return ids, "".join(e.text for e in events), finals[0]
