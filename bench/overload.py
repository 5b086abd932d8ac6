"""Overload: find the server's saturation, then offer 2x and 4x that load and watch it hold.

    python bench/overload.py                   # the demo zoo (dynamerge serve, its own process)
    python bench/overload.py --zoo micro --seconds 10

1. Reference answers: each prompt once, alone (greedy, so every later answer must equal it).
2. Saturation: closed-loop clients at 1, 2, 4, ... until requests/s stops growing by 10%.
3. Overload: open-loop arrivals (Poisson) at 2x and 4x the saturation rate for `--seconds`
   each, every request its own connection; the server's queue (DYNAMERGE_MAX_QUEUE) fills
   and the overflow is refused with 429.
4. After: the server must be ready and answer correctly.

Reported per phase: time to a 429 for the overflow (p50 / p95, target <= 50 ms) and whether
each carried `Retry-After`; accepted requests and how many came back 200 with the reference
answer (target: all); /health latency sampled every 100 ms during the phase (p50 / p95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    name: str
    offered_rps: float
    accepted: int = 0
    correct: int = 0
    refused_ms: list[float] = field(default_factory=list)
    retry_after: int = 0
    other: list[str] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)


def _body(prompt: str, max_tokens: int) -> dict:
    return {"model": "auto", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}


async def _ask(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=_body(prompt, max_tokens))


async def references(url: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        out = {}
        for prompt in prompts:
            response = await _ask(client, prompt, max_tokens)
            response.raise_for_status()
            out[prompt] = response.json()["choices"][0]["message"]["content"]
        return out


async def _closed_loop(client: httpx.AsyncClient, prompts: list[str], max_tokens: int,
                       clients: int, seconds: float) -> float:
    """Requests/s of `clients` closed-loop clients over `seconds`."""
    deadline, started, done = time.monotonic() + seconds, time.monotonic(), [0]

    async def loop(k: int) -> None:
        while time.monotonic() < deadline:
            (await _ask(client, prompts[k % len(prompts)], max_tokens)).raise_for_status()
            done[0], k = done[0] + 1, k + clients

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return done[0] / (time.monotonic() - started)


async def saturation(url: str, prompts: list[str], max_tokens: int, seconds: float) -> float:
    """Requests/s of closed-loop clients, doubling them until it stops growing by 10%."""
    best, clients = 0.0, 1
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while clients <= 64:
            rate = await _closed_loop(client, prompts, max_tokens, clients, seconds)
            print(f"  {clients:>2} clients: {rate:.2f} req/s")
            if rate < best * 1.1:
                break
            best, clients = max(best, rate), clients * 2
    return best


async def overload(url: str, prompts: list[str], answers: dict[str, str], rate: float,
                   seconds: float, max_tokens: int, name: str) -> Phase:
    phase = Phase(name, rate)
    rng = random.Random(name)
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(prompt: str) -> None:
            started = time.perf_counter()
            response = await _ask(client, prompt, max_tokens)
            elapsed = 1000 * (time.perf_counter() - started)
            if response.status_code == 429:
                phase.refused_ms.append(elapsed)
                phase.retry_after += "retry-after" in response.headers
            elif response.status_code == 200:
                phase.accepted += 1
                text = response.json()["choices"][0]["message"]["content"]
                phase.correct += text == answers[prompt]
            else:
                phase.other.append(f"{response.status_code} {response.text[:120]}")

        async def health() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                await client.get("/health")
                phase.health_ms.append(1000 * (time.perf_counter() - started))
                await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(health())]
        while time.monotonic() < stop:
            tasks.append(asyncio.create_task(one(rng.choice(prompts))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return phase


def _p(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.1f}" if values else "-"


def _report(phases: list[Phase]) -> None:
    print("\n| phase | offered (req/s) | accepted | correct | refused 429 | 429 p50 / p95 (ms) "
          "| with Retry-After | other | /health p50 / p95 (ms) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for p in phases:
        print(f"| {p.name} | {p.offered_rps:.2f} | {p.accepted} | {p.correct} | "
              f"{len(p.refused_ms)} | {_p(p.refused_ms, 50)} / {_p(p.refused_ms, 95)} | "
              f"{p.retry_after} | {len(p.other)} | {_p(p.health_ms, 50)} / "
              f"{_p(p.health_ms, 95)} |")
    refused = [ms for p in phases for ms in p.refused_ms]
    fast = bool(refused) and np.percentile(refused, 95) <= 50
    correct = all(p.correct == p.accepted and not p.other for p in phases)
    print(f"\n429 p95 <= 50 ms: {'met' if fast else 'MISSED'}; every accepted request "
          f"answered correctly: {'met' if correct else 'MISSED'}")
    for p in phases:
        for line in p.other[:3]:
            print(f"  {p.name}: {line}")


def _server(zoo: str, port: int, scratch: Path, max_queue: int) -> subprocess.Popen:
    env = {**os.environ, "DYNAMERGE_PORT": str(port), "DYNAMERGE_LOG_LEVEL": "warning",
           "DYNAMERGE_MAX_QUEUE": str(max_queue)}
    if zoo == "micro":
        from adapters.zoo.micro import build_micro_zoo

        micro = build_micro_zoo(scratch / "micro")
        env.update(DYNAMERGE_BASE_MODEL=str(micro.base_dir),
                   DYNAMERGE_ADAPTER_STORE=str(micro.store_dir),
                   DYNAMERGE_CACHE_DIR=str(scratch / "cache"))
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _prompts(zoo: str, scratch: Path, count: int) -> list[str]:
    if zoo == "micro":
        store = scratch / "micro" / "adapters"
    else:
        from app.settings import DEMO_STORE

        store = DEMO_STORE
    per_task = [[json.loads(line)["prompt"] for line in (d / "eval.jsonl").read_text()
                 .splitlines()] for d in sorted(store.iterdir()) if (d / "eval.jsonl").is_file()]
    mixed = [p for group in zip(*per_task, strict=False) for p in group]
    return mixed[:count]


async def _main(args: argparse.Namespace, url: str, prompts: list[str]) -> None:
    answers = await references(url, prompts, args.max_tokens)
    print("saturation:")
    rate = await saturation(url, prompts, args.max_tokens, args.saturation_seconds)
    phases = [await overload(url, prompts, answers, k * rate, args.seconds, args.max_tokens,
                             f"{k}x saturation") for k in (2, 4)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        ready = (await client.get("/ready")).status_code
        after = await _ask(client, prompts[0], args.max_tokens)
    _report(phases)
    healthy = ready == 200 and after.status_code == 200 and \
        after.json()["choices"][0]["message"]["content"] == answers[prompts[0]]
    print(f"after the overload: /ready {ready}, a request answered correctly: "
          f"{'yes' if healthy else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=["demo", "micro"], default="demo")
    parser.add_argument("--seconds", type=float, default=20.0, help="per overload phase")
    parser.add_argument("--saturation-seconds", type=float, default=15.0, help="per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-queue", type=int, default=32,
                        help="the server's DYNAMERGE_MAX_QUEUE (requests in flight before 429)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="dynamerge-overload-") as scratch:
        server = _server(args.zoo, port, Path(scratch), args.max_queue)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            asyncio.run(_main(args, url, _prompts(args.zoo, Path(scratch), args.prompts)))
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
