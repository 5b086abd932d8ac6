"""Routed chats against a running server, through the official OpenAI client.

    dynamerge serve &        # or any base URL
    python bench/chat_latency.py --base-url http://127.0.0.1:8000/v1

1. Latency: a few short chats one at a time, streamed: TTFT, TPOT, tokens/s, adapters.
2. Concurrency: the same `--concurrent` routed chats (the demo's held-out prompts, one task
   after another, real EOS) sent one after another, then all at once: aggregate tokens/s of
   each and their ratio (the target for 8 is >= 3).
3. The event loop under load: `/health` is timed every 50 ms while `--load` chats run at
   once; templating, tokenising and routing run off the loop, so it must stay fast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai

PROMPTS = [
    "What is 47 plus 38?",
    "Spell 'garden' letter by letter.",
    "Reverse the word order: blue sky over hills",
    "Tell me a short story about a lighthouse keeper.",  # out of domain: falls back to base
]
DEMO = Path(__file__).resolve().parent.parent / "adapters" / "zoo" / "demo"


def latency(client: openai.OpenAI, max_tokens: int, rounds: int) -> None:
    ttfts, tpots = [], []
    print(f"{'prompt':<34} {'TTFT ms':>8} {'tokens':>6} {'tok/s':>6} {'TPOT ms':>8}  adapters")
    for prompt in PROMPTS * rounds:
        started, first, tokens, routing = time.perf_counter(), None, 0, None
        stream = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            routing = routing or getattr(chunk, "routing", None)
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        first = first or end
        tpot = (end - first) / max(tokens - 1, 1)
        ttfts.append(first - started)
        tpots.append(tpot)
        chosen = ",".join(a["id"] for a in (routing or {}).get("adapters", [])) or "base"
        print(f"{prompt[:34]:<34} {(first - started) * 1000:8.1f} {tokens:6d} "
              f"{tokens / (end - started):6.1f} {tpot * 1000:8.1f}  {chosen}")
    print(f"\nmedian TTFT {statistics.median(ttfts) * 1000:.0f} ms, "
          f"median TPOT {statistics.median(tpots) * 1000:.0f} ms "
          f"({1 / statistics.median(tpots):.1f} tokens/s per stream)")


def demo_prompts(count: int) -> list[str]:
    """Held-out prompts, one task after another."""
    per_task = [[json.loads(line)["prompt"] for line in (d / "eval.jsonl").read_text()
                 .splitlines()] for d in sorted(DEMO.iterdir()) if (d / "eval.jsonl").is_file()]
    mixed = [p for group in zip(*per_task, strict=False) for p in group]
    return mixed[:count]


def _chat(client: openai.OpenAI, prompt: str, max_tokens: int) -> int:
    reply = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0)
    return reply.usage.completion_tokens


def _together(client: openai.OpenAI, prompts: list[str], max_tokens: int) -> list[int]:
    tokens = [0] * len(prompts)

    def one(i: int) -> None:
        tokens[i] = _chat(client, prompts[i], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tokens


def concurrency(client: openai.OpenAI, count: int, max_tokens: int, repeats: int) -> None:
    prompts = demo_prompts(count)
    _together(client, prompts, max_tokens)  # warm-up, discarded
    ratios = []
    print(f"\n{count} routed chats (real EOS, at most {max_tokens} tokens):")
    print("| run | sequential tok/s | concurrent tok/s | ratio |\n|--:|--:|--:|--:|")
    for run in range(repeats):
        started = time.perf_counter()
        sequential = sum(_chat(client, p, max_tokens) for p in prompts)
        seq_rate = sequential / (time.perf_counter() - started)
        started = time.perf_counter()
        together = sum(_together(client, prompts, max_tokens))
        con_rate = together / (time.perf_counter() - started)
        ratios.append(con_rate / seq_rate)
        print(f"| {run + 1} | {seq_rate:.1f} | {con_rate:.1f} | {ratios[-1]:.2f} |")
    print(f"median ratio {statistics.median(ratios):.2f} (target >= 3 at 8)")


def loop_under_load(client: openai.OpenAI, base_url: str, load: int, max_tokens: int) -> None:
    health = base_url.rsplit("/v1", 1)[0] + "/health"
    timings: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                started = time.perf_counter()
                http.get(health)
                timings.append(1000 * (time.perf_counter() - started))
                time.sleep(0.05)

    idle = []
    with httpx.Client(timeout=30) as http:
        for _ in range(20):
            started = time.perf_counter()
            http.get(health)
            idle.append(1000 * (time.perf_counter() - started))
    prober = threading.Thread(target=probe)
    prober.start()
    _together(client, (demo_prompts(load) * load)[:load], max_tokens)
    done.set()
    prober.join()
    print(f"\n/health while {load} chats run: p50 {np.percentile(timings, 50):.1f} ms, p95 "
          f"{np.percentile(timings, 95):.1f} ms, max {max(timings):.1f} ms over "
          f"{len(timings)} probes (idle: p50 {np.percentile(idle, 50):.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=16)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                           timeout=600)
    latency(client, args.max_tokens, args.rounds)
    concurrency(client, args.concurrent, args.max_tokens, args.repeats)
    loop_under_load(client, args.base_url, args.load, args.max_tokens)


if __name__ == "__main__":
    main()
