"""How many torch threads a decode step gets: a fixed count, or `auto` from how busy the cores were.

Decoding is bound by memory bandwidth, and on this kind of CPU a second thread still nearly
halves a step (one core cannot saturate the memory bus). But routing (the embedder), tokenising
and HTTP run beside the decode loop, and a multi-threaded step on a core that other work wants
stalls at every OpenMP barrier until its preempted thread runs again: on 2 cores that took
dynamic/base from 0.93 to 0.61 at 16 clients (docs/benchmarks.md). So `auto` decodes on more
threads only while the cores are free, judged from two cheap kernel counters read every window:

- up: the machine's idle CPU over the window (/proc/stat, every process counts, ours too),
  measured while decoding on fewer threads: a core at least `up_idle` idle is free to use;
- down: the share of the window the decoding thread itself waited on a run queue
  (/proc/thread-self/schedstat): other work wants the cores we hold.

The two signals leave a band between them (hysteresis), and after stepping down the count
holds for `hold_windows` windows, so a moderate load does not make it flap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """What the cores did during one window of decode steps."""

    idle_cores: float  # cores idle machine-wide, on average over the window
    delay: float  # share of the window the decoding thread waited for a core (0..1)


@dataclass(frozen=True)
class Policy:
    low: int  # threads under load (the engine's torch_threads)
    high: int  # threads when the cores are free (the usable cores)
    up_idle: float = 0.75  # one more thread when at least this much of a core sat idle...
    down_delay: float = 0.1  # ...one fewer when the decoding thread waited this share of the time
    hold_windows: int = 4  # windows to stay after stepping down


def choose(current: int, window: Window, policy: Policy) -> int:
    """The next window's thread count, from the one just measured at `current` threads."""
    if current > policy.low and window.delay >= policy.down_delay:
        return current - 1
    if (current < policy.high and window.idle_cores >= policy.up_idle
            and window.delay < policy.down_delay):
        return current + 1
    return min(max(current, policy.low), policy.high)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float]:
    """(idle, total) jiffies of all CPUs since boot."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is already counted in user


def _run_delay_s() -> float:
    """Seconds the calling thread has waited on a run queue since it started."""
    with open("/proc/thread-self/schedstat", "rb") as f:
        return int(f.read().split()[1]) / 1e9


class DecodeThreads:
    """Called by the decoding thread before each decode step; returns its thread count.

    It reads the counters once per `window_s` (two small /proc files), so a step pays a clock
    read. Where the counters are missing (not Linux) it stays at `policy.low`.
    """

    def __init__(self, policy: Policy, window_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.window_s = window_s
        self.clock = clock
        self.current = policy.low
        self.cores = usable_cores()
        self._since: float | None = None
        self._idle = self._total = self._delay = 0.0
        self._hold = 0
        self._works = True

    def __call__(self) -> int:
        if not self._works or self.policy.high <= self.policy.low:
            return self.current
        now = self.clock()
        if self._since is None:
            self._start(now)
            return self.current
        if now - self._since < self.window_s:
            return self.current
        try:
            idle, total = _cpu_times()
            delay = _run_delay_s()
        except (OSError, ValueError, IndexError):
            log.warning("no CPU counters here (/proc): decoding on %d threads", self.current)
            self._works = False
            return self.current
        wall = now - self._since
        window = Window(
            idle_cores=self.cores * (idle - self._idle) / max(total - self._total, 1),
            delay=(delay - self._delay) / wall,
        )
        chosen = choose(self.current, window, self.policy)
        if self._hold > 0:
            self._hold -= 1
            chosen = min(chosen, self.current)
        if chosen < self.current:
            self._hold = self.policy.hold_windows
        if chosen != self.current:
            log.debug("decode threads %d -> %d (idle %.2f cores, waited %.0f%%)",
                      self.current, chosen, window.idle_cores, 100 * window.delay)
        self.current = chosen
        self._start(now, idle, total, delay)
        return self.current

    def _start(self, now: float, idle: float | None = None, total: float | None = None,
               delay: float | None = None) -> None:
        try:
            if idle is None or total is None or delay is None:
                idle, total = _cpu_times()
                delay = _run_delay_s()
        except (OSError, ValueError, IndexError):
            self._works = False
            return
        self._since, self._idle, self._total, self._delay = now, idle, total, delay
