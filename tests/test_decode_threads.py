"""The decode-thread policy (`DYNAMERGE_DECODE_THREADS`): its decisions, and the engine using them.

The policy's inputs are kernel counters; its decisions are tested on given counters (a
scripted reader and clock), and the real reader once on this machine's /proc. No timings
are asserted.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from app.engine.engine import Engine
from app.engine.threads import (
    Counters,
    DecodeThreads,
    Policy,
    Window,
    choose,
    read_counters,
    usable_cores,
)
from tests.engine_harness import Harness

POLICY = Policy(low=1, high=2)


@pytest.mark.parametrize(("current", "idle", "delay", "expected"), [
    (1, 0.9, 0.0, 2),  # a core sat idle while decoding on one thread: take it
    (1, 0.5, 0.0, 1),  # half a core busy elsewhere: stay
    (1, 0.9, 0.3, 1),  # idle on average, but the decoding thread itself waited: stay
    (2, 0.0, 0.02, 2),  # both cores ours, hardly any wait: stay
    (2, 0.0, 0.25, 1),  # other work wanted the cores: step down
    (2, 1.0, 0.0, 2),  # already at the top
    (1, 0.0, 0.5, 1),  # already at the bottom
])
def test_choose_steps_by_idle_cores_and_run_queue_wait(current, idle, delay, expected):
    assert choose(current, Window(idle, delay), POLICY) == expected


def test_choose_moves_one_thread_at_a_time_and_stays_in_bounds():
    wide = Policy(low=2, high=8)
    assert choose(2, Window(5.0, 0.0), wide) == 3
    assert choose(8, Window(0.0, 0.9), wide) == 7
    assert choose(1, Window(0.0, 0.9), wide) == 2  # below the floor (a changed setting)
    assert choose(9, Window(0.0, 0.0), wide) == 8


class Script:
    """A clock and counters that the test moves window by window (2 cores)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.idle = self.total = 0.0
        self.delay = 0.0

    def clock(self) -> float:
        return self.now

    def read(self) -> Counters:
        return Counters(self.idle, self.total, self.delay)

    def window(self, idle_cores: float, delay: float, seconds: float = 0.5) -> None:
        jiffies = 100 * seconds * 2
        self.now += seconds
        self.total += jiffies
        self.idle += jiffies * idle_cores / 2
        self.delay += delay * seconds


def _run(policy: DecodeThreads, script: Script, windows: list[tuple[float, float]]
         ) -> list[int]:
    chosen = []
    for idle, delay in windows:
        script.window(idle, delay)
        chosen.append(policy())
    return chosen


def test_policy_holds_within_a_window_then_decides():
    script = Script()
    policy = DecodeThreads(POLICY, 0.5, script.clock, script.read, cores=2)
    assert policy() == 1  # the first call only starts a window
    script.now += 0.2
    script.idle += 40
    script.total += 40
    assert policy() == 1  # mid-window: no decision, no read
    script.now += 0.3
    assert policy() == 2  # a whole window with a core idle


def test_policy_steps_down_under_load_and_backs_off_when_a_step_up_is_undone():
    script = Script()
    policy = DecodeThreads(POLICY, 0.5, script.clock, script.read, cores=2)
    policy()
    free, contended, calm = (0.9, 0.0), (0.0, 0.3), (0.0, 0.02)
    # Both cores used while they are free; a step up undone by the next window (a load in
    # the band between the thresholds: one thread leaves a core idle, two contend) doubles
    # the hold at one thread: 8 windows, then 16.
    assert _run(policy, script, [free, contended]) == [2, 1]
    assert _run(policy, script, [free] * 8 + [free]) == [1] * 8 + [2]
    assert _run(policy, script, [contended] + [free] * 16 + [free]) == [1] * 17 + [2]
    # A step up that held resets the backoff: a later load holds it down 4 windows.
    assert _run(policy, script, [calm, calm]) == [2, 2]
    assert _run(policy, script, [contended] + [free] * 4 + [free]) == [1] * 5 + [2]


def test_fixed_range_never_reads_and_missing_counters_keep_the_floor():
    def fail() -> Counters:
        raise AssertionError("read")

    assert DecodeThreads(Policy(low=2, high=2), read=fail)() == 2

    def missing() -> Counters:
        raise OSError("no /proc here")

    policy = DecodeThreads(POLICY, read=missing)
    assert [policy() for _ in range(3)] == [1, 1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc counters are Linux's")
def test_real_counters_are_read_and_move_forward():
    first = read_counters()
    sum(i * i for i in range(200_000))  # some CPU time
    second = read_counters()
    assert 0 <= first.idle <= first.total
    assert second.total >= first.total and second.idle >= first.idle
    assert second.delay_s >= first.delay_s >= 0


def test_engine_builds_the_setting(micro_settings, monkeypatch):
    fixed = Engine(micro_settings.model_copy(update={"decode_threads": 3}))._decode_threads()
    assert fixed() == 3
    unset = micro_settings.model_copy(update={"decode_threads": None, "torch_threads": 1})
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as `dynamerge serve` sets it
    assert Engine(unset)._decode_threads()() == usable_cores()
    monkeypatch.delenv("OMP_WAIT_POLICY")  # libgomp's spinning default: stay at the floor
    assert Engine(unset)._decode_threads()() == 1
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert Engine(unset)._decode_threads()() == usable_cores()
    auto = Engine(micro_settings.model_copy(update={"decode_threads": "auto",
                                                    "torch_threads": 1}))._decode_threads()
    assert isinstance(auto, DecodeThreads)
    assert (auto.policy.low, auto.policy.high) == (1, max(1, usable_cores()))


def test_decode_forwards_run_on_the_chosen_thread_count(micro_engine):
    """Each decode step runs on what the policy returns for it; prefill keeps its own."""
    h = Harness(micro_engine)
    choices = iter([2, 1, 2, 2, 1, 3, 1, 2, 1, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1])
    given: list[int] = []

    def policy() -> int:
        given.append(next(choices))
        return given[-1]

    h.scheduler.decode_threads = policy
    me = threading.get_ident()
    seen: list[tuple[int, int]] = []  # (tokens per row, threads) of this thread's forwards

    def hook(module, args, kwargs):
        if threading.get_ident() == me:
            seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads()))

    handle = micro_engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    before = torch.get_num_threads()
    try:
        h.add(h.job("What is 2 plus 2?", max_tokens=6),
              h.job("Spell cat", mix="math", max_tokens=6))
        h.run()
    finally:
        handle.remove()
        torch.set_num_threads(before)
    decodes = [threads for tokens, threads in seen if tokens == 1]
    assert len(decodes) == len(given) >= 4
    assert decodes == given


def _in_thread(fn) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def test_routing_encodes_on_its_own_thread_count(micro_engine):
    """A request thread's first torch op takes the process's latest `set_num_threads` (here:
    a decode on more threads); the embedder sets its own count instead."""
    embedder = micro_engine.router.embedder
    assert embedder.threads == micro_engine.threads
    before = torch.get_num_threads()
    seen: list[int] = []

    def request() -> None:
        embedder.encode(["What is 2 plus 2?"])
        seen.append(torch.get_num_threads())

    try:
        _in_thread(lambda: torch.set_num_threads(embedder.threads + 1))
        _in_thread(request)
    finally:
        torch.set_num_threads(before)
    assert seen == [embedder.threads]
