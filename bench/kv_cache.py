"""What the prefix cache buys: the same workloads with it off and on, in one run.

    python bench/kv_cache.py                       # demo zoo
    python bench/kv_cache.py --zoo micro --requests 8

Workloads (routed requests, model="auto", greedy, real EOS, at most --max-tokens tokens):

- long_prompt: eval questions behind bench/throughput.py's ~500-token shop system prompt,
  at 1 and 8 clients; `short` is the same questions without it (the template's own system
  prompt only), the TTFT baseline.
- short chats: the short questions at 8 concurrent clients against 1 (one after another).
- multi_turn: conversations of --turns turns; each turn resends the history (the previous
  replies as text, as chat clients do) plus a follow-up question; TTFT by turn.
- join vs steady (cache on): --join-rows rows decoding --join-steps tokens (ignore EOS) alone,
  then beside --join-feeders clients sending 2-token requests (each to its prompt's own adapter
  by name, so that no routing competes for the CPU) back to back, so that rows join
  and leave about every step (the joins per decode step are printed); the steady rows' TPOT
  p50 (middle half of their tokens) both ways.

Each level runs twice back to back, cache off then on (paired in time: the machine may be
shared). With the cache on, the levels run after one discarded pass over their prompts
(--cold: the cache is emptied before each cache-on level instead), so hits come from earlier
requests with the same start and blend, as on a server that has been up; the multi-turn
conversations are always new.

Prints TTFT p50/p95, TPOT p50, aggregate tokens/s, the prefix hit rate (hit tokens / prompt
tokens looked up, from the server's own counters) and the peak KV memory (pool tokens in use
plus the prefix cache's bytes, sampled every 10 ms), then the issue's target ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from throughput import (
    LONG_SYSTEM_PROMPT,
    Prompt,
    engine_client,
    load_prompts,
    make_settings,
    run_level,
)

from app import metrics
from app.engine.blend import AUTO_MODEL
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams

FOLLOW_UPS = ["Can you explain that?", "Say it another way.", "Is that right?",
              "One more time, briefly.", "Thanks. Anything else?"]


@dataclass
class Row:
    workload: str
    cache: str
    clients: int
    requests: int
    ttft: np.ndarray  # ms
    tpot: np.ndarray  # ms
    tokens_per_s: float
    hit_rate: float
    peak_kv_mib: float


class KvPeak:
    """Samples the KV memory in use (pool tokens and prefix cache) while a level runs."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.peak, self._stop = engine, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        pool, prefix = self.engine.kv_pool, self.engine.prefix_cache
        while not self._stop.wait(0.01):
            cached = prefix.bytes_used if prefix.enabled else 0  # kept, unused while off
            self.peak = max(self.peak, pool.used_tokens * pool.token_bytes + cached)

    def __enter__(self) -> KvPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _counters() -> tuple[float, float]:
    return metrics.PREFIX_CACHE_HITS._value.get(), metrics.PREFIX_CACHE_QUERIES._value.get()


def set_cache(engine: Engine, on: bool, capacity: int) -> None:
    """Between levels (the engine idle): enable or disable reuse, and start cold."""
    engine.prefix_cache.capacity_bytes = capacity if on else 0
    engine.prefix_cache.forget_all()


def pause_cache(engine: Engine, on: bool, capacity: int, cold: bool) -> None:
    """Between levels: turn reuse off or on without dropping the cached blocks (cold: drop
    them before turning it on)."""
    if on and cold:
        engine.prefix_cache.forget_all()
    engine.prefix_cache.capacity_bytes = capacity if on else 0


def level(engine: Engine, workload: str, cache: str, prompts: list[Prompt], clients: int,
          requests: int, max_tokens: int) -> Row:
    run = engine_client(engine, AUTO_MODEL, max_tokens, ignore_eos=False)
    hits, queries = _counters()
    with KvPeak(engine) as peak:
        result = run_level(workload, cache, run, prompts, clients, requests)
    h, q = _counters()
    return Row(workload, cache, clients, requests, result.ms("ttft"), result.ms("tpot"),
               result.tokens_per_s, (h - hits) / max(q - queries, 1), peak.peak / 2**20)


def multi_turn(engine: Engine, cache: str, prompts: list[Prompt], clients: int,
               conversations: int, turns: int, max_tokens: int) -> tuple[Row, list[float]]:
    """Closed-loop clients, each running whole conversations; returns the row and the TTFT
    p50 of each turn index (ms)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    todo = iter(range(conversations))
    lock = threading.Lock()
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    tpots: list[float] = []
    tokens = 0

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            first = prompts[i % len(prompts)]
            history = [{"role": "user", "content": first.text}]
            for turn in range(turns):
                request = GenerationRequest(prompt=engine.render_chat(history),
                                            route_text=first.text, model=AUTO_MODEL,
                                            sampling=sampling)
                submitted = time.perf_counter()
                first_at, parts, event = None, [], None
                for event in engine.submit(request):
                    if first_at is None and event.token_ids:
                        first_at = time.perf_counter()
                    parts.append(event.text)
                done = time.perf_counter()
                n = event.completion_tokens if event is not None else 0
                with lock:
                    by_turn[turn].append(1000 * ((first_at or done) - submitted))
                    if n > 1 and first_at is not None:
                        tpots.append(1000 * (done - first_at) / (n - 1))
                    tokens += n
                history += [{"role": "assistant", "content": "".join(parts)},
                            {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]

    hits, queries = _counters()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    with KvPeak(engine) as peak:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - started
    h, q = _counters()
    row = Row("multi_turn", cache, clients, conversations * turns,
              np.asarray([x for turn in by_turn for x in turn]), np.asarray(tpots or [np.nan]),
              tokens / wall, (h - hits) / max(q - queries, 1), peak.peak / 2**20)
    return row, [float(np.median(t)) for t in by_turn]


def join_vs_steady(engine: Engine, prompts: list[Prompt], rows: int, steps: int,
                   feeders: int) -> tuple[float, float, float]:
    """Decode TPOT of `rows` long-running rows (ignore EOS, `steps` tokens each) alone, then
    with `feeders` closed-loop clients sending two-token requests beside them, so that a row
    joins (and another leaves) about every step. Returns (steady TPOT p50 ms, joining TPOT
    p50 ms, joins per decode step of the second run)."""
    steady_sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    short_sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def request(prompt: Prompt, sampling: SamplingParams, model: str = AUTO_MODEL
                ) -> GenerationRequest:
        return GenerationRequest(prompt=prompt.rendered, route_text=prompt.text,
                                 model=model, sampling=sampling)

    def run(with_joins: bool) -> tuple[float, float]:
        gaps: list[float] = []
        joins = 0
        stop = threading.Event()
        lock = threading.Lock()
        started = threading.Barrier(rows + 1)

        def steady(i: int) -> None:
            times = []
            stream = engine.submit(request(prompts[i % len(prompts)], steady_sampling))
            started.wait()
            for event in stream:
                if event.token_ids:
                    times.append(time.perf_counter())
            # The middle of the run: every row decoding, feeders (if any) going.
            middle = np.diff(times)[steps // 4: 3 * steps // 4]
            with lock:
                gaps.extend(middle.tolist())

        def feeder(i: int) -> None:
            nonlocal joins
            while not stop.is_set():
                # Named adapters: routing (the embedder, on the client's thread) would take
                # the CPU the engine decodes on, which is not the cost of joining.
                prompt = prompts[(i + joins) % len(prompts)]
                for _ in engine.submit(request(prompt, short_sampling, prompt.task)):
                    pass
                with lock:
                    joins += 1

        threads = [threading.Thread(target=steady, args=(i,)) for i in range(rows)]
        for t in threads:
            t.start()
        started.wait()
        feeding = [threading.Thread(target=feeder, args=(i,)) for i in range(feeders)]
        if with_joins:
            for t in feeding:
                t.start()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        if with_joins:
            for t in feeding:
                t.join()
        tpot = float(np.median(gaps)) * 1000
        return tpot, joins / (wall * 1000 / tpot)

    steady_tpot, _ = run(False)
    joining_tpot, per_step = run(True)
    return steady_tpot, joining_tpot, per_step


def print_rows(rows: list[Row]) -> None:
    print(f"{'workload':<12}{'cache':>6}{'clients':>8}{'reqs':>6}{'TTFT p50':>10}{'p95':>8}"
          f"{'TPOT p50':>10}{'tok/s':>8}{'hit rate':>9}{'peak KV MiB':>12}")
    for r in rows:
        print(f"{r.workload:<12}{r.cache:>6}{r.clients:>8}{r.requests:>6}"
              f"{np.nanpercentile(r.ttft, 50):>10.0f}{np.nanpercentile(r.ttft, 95):>8.0f}"
              f"{np.nanpercentile(r.tpot, 50):>10.1f}{r.tokens_per_s:>8.1f}"
              f"{r.hit_rate:>9.2f}{r.peak_kv_mib:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=["demo", "demo-random", "micro"], default="demo")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--join-rows", type=int, default=8,
                        help="steady rows of the join-vs-steady decode section (0: skip it)")
    parser.add_argument("--join-steps", type=int, default=48)
    parser.add_argument("--join-feeders", type=int, default=2,
                        help="clients sending 2-token requests beside the steady rows")
    parser.add_argument("--cold", action="store_true",
                        help="measure the cache from cold (default: after one pass over the "
                             "prompts, as a server that has been up a while)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynamerge-kv-") as scratch:
        settings = make_settings(args.zoo, Path(scratch))
        engine = Engine(settings)
        engine.load(show_progress=False)
        capacity = settings.prefix_cache_bytes
        try:
            long = load_prompts(engine, settings.adapter_store, LONG_SYSTEM_PROMPT)
            short = load_prompts(engine, settings.adapter_store)
            n_long = len(engine.tokenizer(long[0].rendered)["input_ids"])
            n_short = len(engine.tokenizer(short[0].rendered)["input_ids"])
            level(engine, "warm-up", "on", short, 2, 4, args.max_tokens)
            set_cache(engine, True, capacity)
            if not args.cold:
                # Steady state: every prompt of the levels below seen once (discarded).
                for prompts in (long, short):
                    level(engine, "warm-up", "on", prompts, 8, args.requests, args.max_tokens)
            # Each level runs with the cache off, then at once with it on (the blocks kept
            # while it is off), so that a pair sees the same load on a shared machine.
            rows, turns = [], {}
            for workload, prompts, clients in (("long_prompt", long, 1), ("long_prompt", long, 8),
                                               ("short", short, 1), ("short", short, 8)):
                for cache in ("off", "on"):
                    pause_cache(engine, cache == "on", capacity, cold=args.cold)
                    rows.append(level(engine, workload, cache, prompts, clients,
                                      args.requests, args.max_tokens))
            for cache in ("off", "on"):
                pause_cache(engine, cache == "on", capacity, cold=args.cold)
                row, turns[cache] = multi_turn(engine, cache, short, 1, args.conversations,
                                               args.turns, args.max_tokens)
                rows.append(row)
            join = None
            if args.join_rows:
                # Cache on (left on by the loop above): joining rows reuse the template's prefix.
                join = join_vs_steady(engine, short, args.join_rows, args.join_steps,
                                      args.join_feeders)
        finally:
            engine.shutdown()
    print(f"\nzoo={args.zoo}, device={engine.device}, torch threads={engine.threads}, "
          f"KV pool {engine.kv_pool.slots} slots x {engine.kv_pool.slot_tokens} tokens, "
          f"{engine.kv_pool.token_bytes} bytes/token, load avg {os.getloadavg()[0]:.2f}; "
          f"long prompts {n_long} tokens, short {n_short}; {args.requests} requests per level, "
          f"at most {args.max_tokens} tokens, routed, real EOS")
    print_rows(rows)
    for cache, ttfts in turns.items():
        print(f"multi_turn cache {cache}: TTFT p50 by turn (ms): "
              + ", ".join(f"{t:.0f}" for t in ttfts))

    def get(w: str, c: str, k: int) -> Row:
        return next(r for r in rows if (r.workload, r.cache, r.clients) == (w, c, k))

    def p50(r: Row) -> float:
        return float(np.nanpercentile(r.ttft, 50))

    if join is not None:
        steady, joining, per_step = join
        print(f"join vs steady: {args.join_rows} rows decoding {args.join_steps} tokens; TPOT "
              f"p50 steady {steady:.1f} ms, with rows joining {joining:.1f} ms "
              f"({per_step:.2f} joins per decode step, each a 2-token request)")
    checks = [
        ("long_prompt TTFT p50 @1 / short TTFT p50 @1 (cache on)",
         p50(get("long_prompt", "on", 1)) / p50(get("short", "on", 1)), "<=", 1.5),
        ("long_prompt tok/s @8: cache on / cache off",
         get("long_prompt", "on", 8).tokens_per_s / get("long_prompt", "off", 8).tokens_per_s,
         ">=", 4.0),
        ("multi_turn TTFT p50: last turn / first turn (cache on)",
         turns["on"][-1] / turns["on"][0], "<=", 1.5),
        ("short chats tok/s: 8 concurrent / 1 at a time (cache on)",
         get("short", "on", 8).tokens_per_s / get("short", "on", 1).tokens_per_s, ">=", 2.5),
    ]
    if join is not None:
        checks.append(("decode TPOT p50: rows joining every step / steady batch",
                       join[1] / join[0], "<=", 1.2))
    print("\ntargets:")
    for name, value, op, target in checks:
        met = value <= target if op == "<=" else value >= target
        print(f"  {name}: {value:.2f} (target {op} {target}) {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
