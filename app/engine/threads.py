"""How many torch threads a decode step gets: a fixed count, or `auto` from how busy the cores were.

Decoding is bound by memory bandwidth, and on this kind of CPU a second thread still nearly
halves a step (one core cannot saturate the memory bus). But routing (the embedder), tokenising
and HTTP run beside the decode loop, and a multi-threaded step on a core that other work wants
stalls at every OpenMP barrier until its preempted thread runs again: on 2 cores that took
dynamic/base from 0.93 to 0.61 at 16 clients (docs/benchmarks.md). So `auto` decodes on more
threads only while the cores are free, judged from two cheap kernel counters read every window:

- up: the machine's idle CPU over the window (/proc/stat: every process counts, ours too;
  niced work counts as idle, it yields), measured while decoding on fewer threads: a core at
  least `up_idle` idle is free to use;
- down: the share of the window the decoding thread itself waited on a run queue
  (/proc/thread-self/schedstat): other work wants the cores we hold.

The two signals leave a band between them (hysteresis); after stepping down the count holds
for `hold_windows` windows, twice as long each time a step up is undone at once (up to
`max_hold_windows`), so a load that sits in the band does not make it flap.
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
    hold_windows: int = 4  # windows to stay after stepping down; doubled (up to
    max_hold_windows: int = 64  # this) each time a step up is undone by the next window


def choose(current: int, window: Window, policy: Policy) -> int:
    """The next window's thread count, from the one just measured at `current` threads."""
    if current > policy.low and window.delay >= policy.down_delay:
        return current - 1
    if (current < policy.high and window.idle_cores >= policy.up_idle
            and window.delay < policy.down_delay):
        return current + 1
    return min(max(current, policy.low), policy.high)


def omp_threads_sleep() -> bool:
    """Whether OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE, as `dynamerge
    serve` sets it, or a short GOMP_SPINCOUNT) rather than spin for milliseconds, which makes
    a multi-threaded decode collapse on busy cores. Read from the environment that libgomp
    read when torch loaded (set later, it is wrong)."""
    spin = os.environ.get("GOMP_SPINCOUNT", "").strip()
    if spin:
        return spin.isdigit() and int(spin) <= 10_000
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Counters:
    """Kernel counters since boot (CPUs) and since the calling thread started (its wait)."""

    idle: float  # jiffies all CPUs were idle or ran niced work (idle + iowait + nice)
    total: float  # jiffies of all CPUs
    delay_s: float  # seconds the calling thread waited on a run queue


def read_counters() -> Counters:
    """The counters, from /proc/stat and /proc/thread-self/schedstat (Linux)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/thread-self/schedstat", "rb") as f:
        delay_ns = int(f.read().split()[1])
    # Niced work (builds, batch jobs) yields its core to ours: the scheduler gives a nice-10
    # thread a tenth of a contended core. Guest time is already counted in user, so only the
    # first eight fields add up.
    return Counters(fields[1] + fields[3] + fields[4], sum(fields[:8]), delay_ns / 1e9)


class DecodeThreads:
    """Called by the decoding thread before each decode step; returns its thread count.

    It reads the counters once per `window_s` (two small /proc files), so a step pays a clock
    read. Where the counters are missing (not Linux) it stays at `policy.low`.
    """

    def __init__(self, policy: Policy, window_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 read: Callable[[], Counters] = read_counters, cores: int | None = None
                 ) -> None:
        self.policy = policy
        self.window_s = window_s
        self.clock = clock
        self.read = read
        self.cores = cores or usable_cores()
        self.current = policy.low
        self._since: float | None = None
        self._last: Counters | None = None
        self._hold = 0  # windows left before the count may rise again
        self._backoff = policy.hold_windows
        self._rose = False  # the last window stepped up
        self._works = policy.high > policy.low

    def __call__(self) -> int:
        if not self._works:
            return self.current
        now = self.clock()
        if self._since is not None and now - self._since < self.window_s:
            return self.current
        try:
            counters = self.read()
        except (OSError, ValueError, IndexError):
            log.warning("no CPU counters here (/proc): decoding on %d threads", self.current)
            self._works = False
            return self.current
        if self._since is not None and self._last is not None:
            self._decide(now - self._since, self._last, counters)
        self._since, self._last = now, counters
        return self.current

    def _decide(self, wall: float, before: Counters, after: Counters) -> None:
        window = Window(
            idle_cores=self.cores * (after.idle - before.idle) / max(after.total - before.total,
                                                                     1),
            delay=(after.delay_s - before.delay_s) / wall,
        )
        chosen = choose(self.current, window, self.policy)
        if self._hold > 0:  # stepped down lately: no step up yet
            self._hold -= 1
            chosen = min(chosen, self.current)
        if chosen < self.current:
            # A step up undone at once: the idle core was not free for us (a load in the band
            # between the two thresholds); wait longer before the next try.
            if self._rose:
                self._backoff = min(2 * self._backoff, self.policy.max_hold_windows)
            self._hold = self._backoff
        elif chosen == self.current > self.policy.low:
            self._backoff = self.policy.hold_windows  # a step up that held: forget the backoff
        self._rose = chosen > self.current
        if chosen != self.current:
            log.debug("decode threads %d -> %d (idle %.2f cores, waited %.0f%%)",
                      self.current, chosen, window.idle_cores, 100 * window.delay)
        self.current = chosen
