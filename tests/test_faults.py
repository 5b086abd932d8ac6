"""Fault injection: whatever fails, and wherever, every request is finished exactly once, its
slots and its place in flight are given back, and the next request is answered correctly.

Faults are produced for real where they can be (a NaN adapter in a slot, an adapter file whose
values are bad, a closed event loop, a stop string that breaks when it is checked); a stub
replaces a method only for faults nothing else can produce on demand (a failing forward pass,
a merge build that raises, a bug in the scheduler loop), and says so.
"""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
import torch
from engine_harness import Harness, tokens_and_text
from safetensors.torch import load_file, save_file

from adapters.registry import LoraAdapter, LoraModule
from adapters.zoo.micro import topic_prompts
from app.engine.engine import Engine
from app.engine.stream import GenerationStream
from app.engine.types import (
    AdapterPlacementError,
    EngineDeadError,
    GenerationError,
    GenerationRequest,
    SamplingParams,
)

MATH = topic_prompts("math", 1, 4000)[0]
TRAVEL = topic_prompts("travel", 1, 4001)[0]


def _final(harness: Harness, job):
    ids, _text, reason = tokens_and_text(harness.events(job))
    return reason, ids


class _FailingConstraint:
    """A constraint that raises at its `fail_at`-th question: a sampling fault of one row."""

    def __init__(self, fail_at: int) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def allows(self, token_id: int) -> bool:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("injected sampling fault")
        return True

    def advance(self, token_id: int) -> None:
        pass

    @property
    def complete(self) -> bool:
        return False


def test_a_row_failing_in_the_step_another_finishes_in_is_finished_once(micro_engine):
    """The double-finish repro: row 0 ends (length) in the very step in which row 1's
    sampler raises; each gets one final event and one release."""
    failing = {}
    harness = Harness(micro_engine, constraint_for=lambda r: failing.get(r.request_id))
    row0 = harness.job(MATH, "math", max_tokens=2, ignore_eos=True)
    row1 = harness.job(TRAVEL, "travel", max_tokens=10, ignore_eos=True)
    failing[row1.request.request_id] = _FailingConstraint(fail_at=2)
    harness.add(row0, row1)
    harness.run()
    assert dict(harness.done) == {row0.request.request_id: 1, row1.request.request_id: 1}
    assert _final(harness, row0)[0] == "length"
    assert _final(harness, row1)[0] == "error"
    assert harness.scheduler.active == 0 and not harness.scheduler.waiting


def test_a_non_finite_adapter_never_enters_a_slot(micro_engine):
    """0 * NaN is NaN: a NaN slot would poison every row of its batch, so writes refuse it."""
    from adapters.errors import IncompatibleAdapterError

    engine = micro_engine
    source = engine.merging.adapters["cooking"]
    bad = LoraAdapter("nan-adapter", source.path, {
        name: LoraModule(m.A, torch.full_like(m.B, float("nan")), m.scaling)
        for name, m in source.modules.items()
    }, ())
    with engine.model_lock, engine.residency._lock:
        slot, _ = engine.slots.claim("adapter")
        with pytest.raises(IncompatibleAdapterError, match="NaN or inf"):
            engine.slots.write(slot, bad)
        assert "nan-adapter" not in engine.slots


def test_nan_logits_fail_their_row_only(micro_engine):
    """A real NaN: an adapter with huge (finite) factors overflows its rows' activations to
    inf, and inf - inf to NaN, in a spare slot; rows that don't use it are untouched."""
    engine = micro_engine
    alone = Harness(engine)
    good_alone = alone.job(MATH, "math", ignore_eos=True)
    alone.add(good_alone)
    alone.run()
    expected = _final(alone, good_alone)

    source = engine.merging.adapters["cooking"]
    bad = LoraAdapter("huge-adapter", source.path, {
        name: LoraModule(torch.full_like(m.A, 1e30), torch.full_like(m.B, 1e30), m.scaling)
        for name, m in source.modules.items()
    }, ())
    with engine.model_lock, engine.residency._lock:
        slot, _ = engine.slots.claim("adapter")
        engine.slots.write(slot, bad)
    try:
        harness = Harness(engine)
        good = harness.job(MATH, "math", ignore_eos=True)
        poisoned = harness.job(TRAVEL, "base", ignore_eos=True)
        poisoned.rows = [(slot, 1.0)]
        harness.add(good, poisoned)
        harness.run()
        assert _final(harness, poisoned)[0] == "error"
        assert _final(harness, good) == expected
        assert all(n == 1 for n in harness.done.values()) and len(harness.done) == 2
    finally:
        engine.residency.retire("huge-adapter")


def test_a_failed_forward_fails_the_rows_of_that_forward_only(micro_engine, monkeypatch):
    """Stub: no real input makes a forward pass raise on demand, so the prefill of the second
    pair of requests is made to raise once; the row already decoding carries on."""
    harness = Harness(micro_engine)
    reference = Harness(micro_engine)
    ref_job = reference.job(MATH, "math", max_tokens=10, ignore_eos=True)
    reference.add(ref_job)
    reference.run()

    running = harness.job(MATH, "math", max_tokens=10, ignore_eos=True)
    harness.add(running)
    harness.scheduler.step()
    late = [harness.job(TRAVEL, "travel"), harness.job("Hi", "base")]
    harness.add(*late)
    original = harness.scheduler._prefill_forward
    calls = []

    def failing(chosen):
        calls.append(len(chosen))
        if len(calls) == 1:
            raise RuntimeError("injected forward fault")
        return original(chosen)

    monkeypatch.setattr(harness.scheduler, "_prefill_forward", failing)
    harness.run()
    assert [_final(harness, j)[0] for j in late] == ["error", "error"]
    assert _final(harness, running) == _final(reference, ref_job)
    assert all(n == 1 for n in harness.done.values()) and len(harness.done) == 3


def test_a_failed_decode_step_fails_the_batch_not_the_queue(micro_engine, monkeypatch):
    """Stub, as above, for the decode forward: its rows fail, a waiting request still runs."""
    harness = Harness(micro_engine)
    decoding = [harness.job(MATH, "math", max_tokens=8, ignore_eos=True),
                harness.job(TRAVEL, "travel", max_tokens=8, ignore_eos=True)]
    harness.add(*decoding)
    harness.scheduler.step()
    original = harness.scheduler._forward
    state = {"failed": False}

    def forward(input_ids, *args):
        if input_ids.shape[1] == 1 and not state["failed"]:  # the decode pass
            state["failed"] = True
            raise RuntimeError("injected decode fault")
        return original(input_ids, *args)

    monkeypatch.setattr(harness.scheduler, "_forward", forward)
    waiting = harness.job("Hi", "base", max_tokens=3)
    harness.add(waiting)
    harness.run()
    assert [_final(harness, j)[0] for j in decoding] == ["error", "error"]
    assert _final(harness, waiting)[0] in ("stop", "length")
    assert all(n == 1 for n in harness.done.values()) and len(harness.done) == 3


class _BrokenStop(str):
    """A stop string that breaks when the stop check slices it: a real detokenize-time fault
    in `IncrementalText`."""

    def __getitem__(self, key):
        raise RuntimeError("injected stop-check fault")


def test_a_stop_check_failure_fails_its_row_only(micro_engine):
    harness = Harness(micro_engine)
    broken = harness.job(MATH, "math", max_tokens=8, stop=(_BrokenStop("zzzz"),))
    fine = harness.job(TRAVEL, "travel", max_tokens=8)
    harness.add(broken, fine)
    harness.run()
    assert _final(harness, broken)[0] == "error"
    assert _final(harness, fine)[0] in ("stop", "length")
    assert all(n == 1 for n in harness.done.values())


def test_a_client_whose_loop_closed_is_dropped_at_the_next_step(micro_engine):
    """A real closed event loop: events can't reach it, so the row is cancelled."""
    harness = Harness(micro_engine)
    job = harness.job(MATH, "math", max_tokens=50, ignore_eos=True)
    loop = asyncio.new_event_loop()
    loop.close()
    job.stream = GenerationStream(job.stream.admission, loop)
    other = harness.job(TRAVEL, "travel", max_tokens=6, ignore_eos=True)
    harness.add(job, other)
    harness.run()
    assert job.stream.cancelled
    assert job.stream.final is not None and job.stream.final.finish_reason == "cancelled"
    assert harness.done[job.request.request_id] == 1
    assert _final(harness, other)[0] == "length"


def _quiet(engine: Engine) -> None:
    with engine._lock:
        assert not engine._in_flight
    with engine.residency._lock:
        assert all(engine.slots.refs(a) == 0 for a in engine.slots.resident())
    assert engine.scheduler.active == 0


def _ask(engine: Engine, model: str = "auto", text: str = MATH, **sampling):
    prompt = engine.render_chat([{"role": "user", "content": text}])
    return engine.submit(GenerationRequest(prompt, text, model=model, sampling=SamplingParams(
        **{"max_tokens": 6, "temperature": 0.0, **sampling})))


def test_an_adapter_whose_values_are_bad_fails_its_request_and_is_refused(micro_zoo,
                                                                          micro_engine):
    """Real: the header is fine (it passes validation at registration), the tensors hold
    NaN, which only loading can see."""
    engine = micro_engine
    expected = _ask(engine).result()[0]
    target = micro_zoo.store_dir / "rotten"
    shutil.copytree(micro_zoo.store_dir / "math", target)
    try:
        weights = target / "adapter_model.safetensors"
        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}
        save_file(tensors, weights)
        engine.register_adapter("rotten")
        _, final = _ask(engine, model="rotten").result()
        assert final.finish_reason == "error"
        assert isinstance(final.error, AdapterPlacementError)
        assert "NaN" in str(final.error)
        assert "rotten" not in engine.models()
        assert "rotten" in {r.id for r in engine.refused_adapters()}
        assert "rotten" not in engine.route(MATH).scores  # nothing routes to it any more
        _quiet(engine)
        assert _ask(engine).result()[0] == expected
    finally:
        shutil.rmtree(target)


def test_a_merge_build_that_fails_leaves_nothing_behind(micro_engine, monkeypatch):
    """Stub: a merge build that raises (memory, a bug) is replaced by a raising function."""
    engine = micro_engine
    expected = _ask(engine).result()[0]

    def broken(*args, **kwargs):
        raise RuntimeError("injected merge fault")

    monkeypatch.setattr(engine.merging.factory, "build", broken)
    prompt = engine.render_chat([{"role": "user", "content": MATH}])
    from app.engine.types import MergeSpec

    request = GenerationRequest(prompt, MATH, mix=(("math", 0.5), ("travel", 0.5)),
                                merge=MergeSpec(method="ties", params=(("density", 0.77),)),
                                sampling=SamplingParams(max_tokens=4, temperature=0.0))
    with pytest.raises(RuntimeError, match="injected merge fault"):
        engine.submit(request)
    _quiet(engine)
    assert _ask(engine).result()[0] == expected


def test_admission_never_exceeds_the_queue_limit_and_returns_to_zero(micro_engine):
    engine = micro_engine
    limit = engine.settings.max_queue
    seen, streams, refused = [], [], []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(6):
            try:
                stream = _ask(engine, max_tokens=4)
            except Exception as exc:  # 429s
                refused.append(type(exc).__name__)
                continue
            with engine._lock:
                seen.append(len(engine._in_flight))
            with lock:
                streams.append(stream)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for stream in streams:
        stream.result()
    assert max(seen) <= limit
    assert set(refused) <= {"EngineOverloadedError"}
    _quiet(engine)


@pytest.fixture
def doomed_engine(micro_settings) -> Engine:
    engine = Engine(micro_settings.model_copy(update={"max_queue": 64}))
    engine.load(show_progress=False)
    yield engine
    engine.shutdown()


def test_a_dead_worker_fails_everything_once_and_turns_health_dead(doomed_engine, monkeypatch):
    """Stub: a bug in the scheduler loop itself (beyond any one request) is simulated by a
    step that raises once three requests are decoding; nothing else can produce it."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    engine = doomed_engine
    scheduler = engine.scheduler
    original = scheduler.step
    finished: list[str] = []
    release = engine._release

    def counting_release(job):
        finished.append(job.request.request_id)
        release(job)

    scheduler.on_done = counting_release

    def step():
        if scheduler.active >= 3:
            raise RuntimeError("injected scheduler bug")
        original()

    monkeypatch.setattr(scheduler, "step", step)
    with engine.model_lock:  # the worker waits in its first forward until all are admitted
        streams = [_ask(engine, max_tokens=100, ignore_eos=True, text=t)
                   for t in (MATH, TRAVEL, "Hi", "Hello there")]
    finals = [s.result()[1] for s in streams]
    assert all(f.finish_reason == "error" for f in finals)
    assert all(isinstance(f.error, EngineDeadError) for f in finals)
    assert sorted(finished) == sorted(s.request_id for s in streams)  # once each
    assert engine.health() == "dead"
    with pytest.raises(EngineDeadError):
        _ask(engine)
    with TestClient(create_app(engine.settings, engine)) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        response = client.post("/v1/completions", json={"model": "base", "prompt": "Hi"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"


def test_generation_errors_never_carry_internal_details():
    from app.engine.scheduler import _failed

    error = _failed("the decode step", FileNotFoundError("/secret/path/weights.bin"))
    assert isinstance(error, GenerationError)
    assert "/secret" not in str(error) and "FileNotFoundError" in str(error)
