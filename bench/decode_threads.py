"""Decode threads over HTTP: fixed 1, fixed 2 and `auto`, one server each, measured alternately.

    python bench/decode_threads.py                                  # 1, 2, auto; 1/4/8/16 clients
    python bench/decode_threads.py --configs 1 2 2-spin auto --seconds 15 --rounds 2

Starts one `dynamerge serve` (demo zoo, loopback, a free port) per configuration of
`DYNAMERGE_DECODE_THREADS` (the server's default OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep
as soon as a region ends; "-spin": GOMP_SPINCOUNT=300000, libgomp's own default, threads spin
between regions), then for each client level and model
(base, and routed top-3 "auto") runs every server in turn for `--seconds`: closed-loop clients
streaming chat completions (temperature 0, `--max-tokens` with ignore_eos, the demo's held-out
prompts of every task, interleaved). Only the server being measured has work; the others idle.

Reported per cell: aggregate tokens/s (tokens of the requests finished / wall time), TPOT p50
(client-side, first to last streamed token), the decode threads the server used (its
`dynamerge_decode_threads` gauge, sampled every second) and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Cell:
    config: str
    model: str
    clients: int
    tokens: int = 0
    wall_s: float = 0.0
    tpot_ms: list[float] = field(default_factory=list)
    threads: list[float] = field(default_factory=list)
    load: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def _env(config: str, port: int) -> dict[str, str]:
    threads, _, wait = config.partition("-")
    env = {**os.environ, "DYNAMERGE_PORT": str(port), "DYNAMERGE_LOG_LEVEL": "warning",
           "DYNAMERGE_DECODE_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if wait == "spin":  # libgomp's own default (the server's before it set PASSIVE)
        env["GOMP_SPINCOUNT"] = "300000"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(count: int) -> list[str]:
    from app.settings import DEMO_STORE

    per_task = [[json.loads(line)["prompt"] for line in (d / "eval.jsonl").read_text()
                 .splitlines()] for d in sorted(DEMO_STORE.iterdir())
                if (d / "eval.jsonl").is_file()]
    return [p for group in zip(*per_task, strict=False) for p in group][:count]


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
               ) -> tuple[int, float | None]:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": prompt}]}
    stamps: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
                stamps.append(time.perf_counter())
    tokens = len(stamps)
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
    return tokens, tpot


async def _cell(url: str, cell: Cell, prompts: list[str], seconds: float, max_tokens: int
                ) -> None:
    limits = httpx.Limits(max_connections=cell.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds
        ended = [start]

        async def loop(k: int) -> None:
            while time.perf_counter() < deadline:
                tokens, tpot = await _one(client, cell.model, prompts[k % len(prompts)],
                                          max_tokens)
                cell.tokens += tokens
                if tpot is not None:
                    cell.tpot_ms.append(1000 * tpot)
                ended[0] = max(ended[0], time.perf_counter())
                k += cell.clients

        async def sample() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(1.0)
                text = (await client.get("/metrics")).text
                for line in text.splitlines():
                    if line.startswith("dynamerge_decode_threads "):
                        cell.threads.append(float(line.split()[1]))

        await asyncio.gather(sample(), *(loop(i) for i in range(cell.clients)))
        cell.wall_s = ended[0] - start
    cell.load = os.getloadavg()[0]


def _wait_ready(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("a server did not start")
        time.sleep(1)


def _report(cells: list[Cell], configs: list[str]) -> None:
    heads = " | ".join(f"{c} tok/s (TPOT p50 ms) [threads]" for c in configs)
    print(f"\n| model | clients | {heads} | load |")
    print("|---|--:|" + "--:|" * len(configs) + "--:|")
    keys = sorted({(c.model, c.clients) for c in cells}, key=lambda k: (k[0] != "base", k[1]))
    for model, clients in keys:
        parts, loads = [], []
        for config in configs:
            mine = [c for c in cells if (c.config, c.model, c.clients) == (config, model, clients)]
            tokens, wall = sum(c.tokens for c in mine), sum(c.wall_s for c in mine)
            tpot = statistics.median([t for c in mine for t in c.tpot_ms] or [float("nan")])
            threads = [t for c in mine for t in c.threads]
            used = f"{statistics.mean(threads):.1f}" if threads else "-"
            parts.append(f"{tokens / wall:.1f} ({tpot:.0f}) [{used}]")
            loads += [c.load for c in mine]
        print(f"| {model} | {clients} | {' | '.join(parts)} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--models", nargs="+", default=["base", "auto"])
    parser.add_argument("--seconds", type=float, default=12.0, help="per cell")
    parser.add_argument("--rounds", type=int, default=1, help="passes over every cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = _prompts(48)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="dynamerge-threads-"):
        try:
            for config in args.configs:
                port = _free_port()
                server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO,
                                          env=_env(config, port), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                servers[config] = (server, f"http://127.0.0.1:{port}")
            for server, url in servers.values():
                _wait_ready(url, server)
            print(f"servers ready; load {os.getloadavg()}", flush=True)
            for round_ in range(args.rounds):
                for clients in args.levels:
                    for model in args.models:
                        # alternate the order between rounds and levels: no config always first
                        order = args.configs if (round_ + clients) % 2 == 0 else \
                            args.configs[::-1]
                        for config in order:
                            cell = Cell(config, model, clients)
                            asyncio.run(_cell(servers[config][1], cell, prompts, args.seconds,
                                              args.max_tokens))
                            cells.append(cell)
                            print(f"  r{round_} {model} {clients} clients, {config}: "
                                  f"{cell.tok_s:.1f} tok/s, TPOT p50 "
                                  f"{statistics.median(cell.tpot_ms or [float('nan')]):.0f} ms,"
                                  f" threads {cell.threads}, load {cell.load:.2f}", flush=True)
        finally:
            for server, _ in servers.values():
                server.terminate()
            for server, _ in servers.values():
                server.wait(timeout=60)
    _report(cells, args.configs)


if __name__ == "__main__":
    main()
