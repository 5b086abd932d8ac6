"""Soak: thousands of short requests over many routed mixes, merges and adapter loads, with
the server's memory and every counter that could leak watched.

    python bench/soak.py                              # 10,000 requests (micro base, 40 adapters)
    python bench/soak.py --requests 600 --clients 4   # what CI runs (tests/test_soak.py)

A real server (`dynamerge serve`, its own process, so its RSS is its own) on a loopback port,
over a store of synthetic adapters (`dynamerge zoo synth`, on the micro base so that 10,000
requests take minutes) with fewer device slots than adapters, so adapters keep being loaded
and evicted. Requests cycle through: routed chats over every adapter's held-out prompts,
routing restricted to pairs of adapters, a named adapter alone, and non-linear merges (TIES,
DARE) with parameters drawn from a few values, so merges are built, cached and evicted.

Reported: RSS at start, after warm-up (the first `--warmup` share of requests) and at the end
(target: at most 5% growth after warm-up); errors (target: none); and what must be back to
zero or within its cap at the end: running and waiting requests, pinned slots, merge-cache
entries (at most DYNAMERGE_MAX_VIRTUAL_ADAPTERS), open streams.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

ADMIN = "soak-admin"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class SoakReport:
    requests: int
    errors: int
    error_samples: list[str]
    distinct_mixes: int
    merges: int
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    running: float  # at the end: all of these must be zero
    waiting: float
    pinned_requests: int
    merge_entries: float
    merge_cap: int
    seconds: float

    @property
    def growth(self) -> float:
        return (self.rss_end_mb - self.rss_warm_mb) / self.rss_warm_mb

    @property
    def leaks(self) -> list[str]:
        out = []
        if self.running or self.waiting:
            out.append(f"{self.running:g} running and {self.waiting:g} waiting requests left")
        if self.pinned_requests:
            out.append(f"{self.pinned_requests} requests still hold device slots")
        if self.merge_entries > self.merge_cap:
            out.append(f"{self.merge_entries:g} cached merges for a cap of {self.merge_cap}")
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _plan(store: Path, requests: int, seed: int) -> list[dict]:
    """The request bodies, cycling over routed, restricted, named and merged requests."""
    rng = random.Random(seed)
    ids = sorted(p.name for p in store.iterdir() if (p / "eval.jsonl").is_file())
    prompts = {a: [json.loads(line)["prompt"] for line in
                   (store / a / "eval.jsonl").read_text().splitlines()] for a in ids}
    bodies = []
    for i in range(requests):
        adapter = ids[i % len(ids)]
        text = prompts[adapter][(i // len(ids)) % len(prompts[adapter])]
        body: dict = {"model": "auto", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": text}]}
        kind = i % 10
        if kind == 7:
            body["routing"] = {"adapters": rng.sample(ids, 2)}
        elif kind == 8:
            body["model"] = adapter
        elif kind == 9:
            method = rng.choice(["ties", "dare_ties"])
            value = rng.choice([0.2, 0.4, 0.6])
            body["merge"] = {"method": method,
                             ("density" if method == "ties" else "drop_rate"): value}
            body["routing"] = {"adapters": rng.sample(ids, 2)}
        bodies.append(body)
    return bodies


def run_soak(store: Path, base_model: Path, requests: int = 10_000, clients: int = 8,
             slots: int = 4, virtual: int = 4, warmup: float = 0.1, seed: int = 0,
             progress: bool = True) -> SoakReport:
    """Serve `requests` requests from `clients` threads and report what leaked."""
    port = _free_port()
    cache = Path(tempfile.mkdtemp(prefix="dynamerge-soak-"))
    env = {**os.environ, "DYNAMERGE_BASE_MODEL": str(base_model),
           "DYNAMERGE_ADAPTER_STORE": str(store), "DYNAMERGE_CACHE_DIR": str(cache),
           "DYNAMERGE_PORT": str(port), "DYNAMERGE_MAX_ADAPTERS": str(slots),
           "DYNAMERGE_MAX_VIRTUAL_ADAPTERS": str(virtual), "DYNAMERGE_TOP_K": "2",
           "DYNAMERGE_ADMIN_KEY": ADMIN, "DYNAMERGE_MAX_QUEUE": str(4 * clients),
           "DYNAMERGE_LOG_LEVEL": "warning", "DYNAMERGE_MERGE_STORAGE": "svd",
           "DYNAMERGE_MERGE_RANK": "8",
           # Every top-K hit is blended (Eq. 9) at the settings' softer temperature: more
           # distinct mixes, more slots in play than a calibrated router would use.
           "DYNAMERGE_MIN_WEIGHT": "0", "DYNAMERGE_CALIBRATION": "off"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        return _drive(url, server.pid, _plan(store, requests, seed), clients, virtual, warmup,
                      progress)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(cache, ignore_errors=True)  # the run's embeddings and TE inputs


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def _drive(url: str, pid: int, bodies: list[dict], clients: int, cap: int, warmup: float,
           progress: bool) -> SoakReport:
    from tqdm.auto import tqdm

    rss_start = _rss_mb(pid)
    errors: list[str] = []
    mixes: set[str] = set()
    lock = threading.Lock()
    todo = iter(range(len(bodies)))
    warm_at = max(1, int(warmup * len(bodies)))
    rss_warm = [rss_start]
    bar = tqdm(total=len(bodies), desc="soak", unit="req", disable=not progress)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                response = http.post("/v1/chat/completions", json=bodies[i])
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        mixes.add(response.headers.get("x-dynamerge-adapters", ""))
                    bar.update()
                    if bar.n == warm_at:
                        rss_warm[0] = _rss_mb(pid)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    bar.close()
    with httpx.Client(base_url=url, timeout=30) as http:
        text = http.get("/metrics").text
        listing = http.get("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    return SoakReport(
        requests=len(bodies), errors=len(errors), error_samples=errors[:5],
        distinct_mixes=len(mixes), merges=sum("merge" in b for b in bodies),
        rss_start_mb=rss_start, rss_warm_mb=rss_warm[0], rss_end_mb=_rss_mb(pid),
        running=_metric(text, "vllm:num_requests_running"),
        waiting=_metric(text, "vllm:num_requests_waiting"),
        pinned_requests=sum(a["requests"] for a in listing["data"]),
        merge_entries=_metric(text, "dynamerge_merge_cache_entries"), merge_cap=cap,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=40, help="synthetic adapters")
    parser.add_argument("--slots", type=int, default=4, help="device slots")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    from adapters.zoo.micro import build_micro_zoo
    from adapters.zoo.synth import synth_zoo

    with tempfile.TemporaryDirectory(prefix="dynamerge-soak-zoo-") as scratch:
        micro = build_micro_zoo(Path(scratch) / "micro")
        store = Path(scratch) / "store"
        synth_zoo(micro.base_dir, store, args.adapters, show_progress=False)
        report = run_soak(store, micro.base_dir, args.requests, args.clients, args.slots)
    print(f"\n{report.requests} requests from {args.clients} clients in {report.seconds:.0f} s "
          f"({report.requests / report.seconds:.1f} req/s), {report.distinct_mixes} distinct "
          f"adapter mixes, {report.merges} non-linear merges; {args.adapters} adapters on "
          f"{args.slots} device slots\n")
    print("| RSS start (MB) | after warm-up | end | growth after warm-up | errors | leaks |")
    print("|--:|--:|--:|--:|--:|---|")
    print(f"| {report.rss_start_mb:.0f} | {report.rss_warm_mb:.0f} | {report.rss_end_mb:.0f} "
          f"| {100 * report.growth:+.1f}% | {report.errors} | "
          f"{'; '.join(report.leaks) or 'none'} |")
    ok = report.growth <= 0.05 and not report.errors and not report.leaks
    print(f"\ntargets (<= 5% growth, no error, nothing leaked): {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "growth": report.growth}, indent=1))


if __name__ == "__main__":
    main()
