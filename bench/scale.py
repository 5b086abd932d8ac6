"""Serving a store larger than the device: 6, 100 and 1,000 adapters, Zipf and uniform traffic.

    python bench/scale.py                              # demo base, stores of 6, 100, 1000
    python bench/scale.py --stores 6 40 --requests 64  # smaller

For each store size (synthetic adapters of the demo base's shapes, `dynamerge zoo synth`,
kept under bench/out/synth-N between runs) a fresh process:

1. starts the engine twice: cold (empty embedding cache) and warm (the cache of the first);
2. runs `--clients` closed-loop clients for `--requests` requests twice: the adapter of each
   request drawn with a Zipf law (alpha 1, ranks in a fixed random order) and uniformly; the
   request is one of that adapter's held-out prompts, routed (model "auto", the server's
   top-K), so the router, not the bench, decides which adapters must be resident;
3. reports aggregate tok/s, TTFT, device-slot hit rate, loads and evictions per second, load
   latency per adapter (disk to host, host to device), start-up times and RSS.

Every request generates exactly `--max-tokens` tokens (ignore-EOS): the random synthetic
adapters have no EOS to stop at, and equal lengths make stores comparable. Throughput is
given as a ratio to the 6-adapter store under the same distribution, measured in this run.
Writes bench/out/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent


# --- one store, in a child process --------------------------------------------------------
def _child(args: argparse.Namespace) -> dict:
    import psutil
    from prometheus_client import REGISTRY

    from app.engine.base_model import base_model_path
    from app.engine.engine import Engine
    from app.engine.types import SamplingParams
    from app.settings import Settings

    store, cache = Path(args.store), Path(args.cache)
    # The converted demo base stays where it is; this cache only holds the embeddings.
    settings = Settings(base_model=base_model_path(Settings()), adapter_store=store,
                        cache_dir=cache, max_adapters=args.slots,
                        max_queue=10_000, max_batch_size=max(16, args.clients),
                        host_adapter_bytes=args.host_bytes)
    report: dict = {"adapters": len([p for p in store.iterdir() if p.is_dir()])}
    for phase in ("cold", "warm"):
        if phase == "cold":
            _clear_embeddings(cache)
        started = time.perf_counter()
        engine = Engine(settings)
        engine.load(show_progress=False)
        report[f"startup_{phase}_s"] = time.perf_counter() - started
        if phase == "cold":
            engine.shutdown()
    ids = engine.adapter_ids()
    prompts = {a: [json.loads(line)["prompt"] for line in
                   (store / a / "eval.jsonl").read_text().splitlines()] for a in ids}
    order = list(ids)
    random.Random(0).shuffle(order)  # Zipf rank -> adapter
    zipf = 1.0 / np.arange(1, len(order) + 1)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    process = psutil.Process()
    for law in ("zipf", "uniform"):
        rng = random.Random(law)
        weights = zipf if law == "zipf" else np.ones(len(order))
        draws = rng.choices(order, weights=weights.tolist(), k=args.requests)
        texts = [rng.choice(prompts[a]) for a in draws]
        _drive(engine, texts[: args.clients], args.clients, sampling)  # warm-up, discarded
        before = _counters(REGISTRY)
        timings, wall = _drive(engine, texts, args.clients, sampling)
        delta = {k: v - before.get(k, 0.0) for k, v in _counters(REGISTRY).items()}
        ttft = 1000 * np.array([t for t, _, _ in timings])
        hits = delta.get("slot_hit", 0.0)
        lookups = hits + delta.get("slot_miss", 0.0)
        report[law] = {
            "tokens_per_s": sum(n for _, _, n in timings) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p95_ms": float(np.percentile(ttft, 95)),
            "slot_hit_rate": hits / lookups if lookups else float("nan"),
            "loads_per_s": delta.get("device_loads", 0.0) / wall,
            "evictions_per_s": delta.get("device_evictions", 0.0) / wall,
            "host_load_ms": _mean_ms(delta, "host"),
            "device_load_ms": _mean_ms(delta, "device"),
            "distinct_adapters": len(set(draws)),
        }
    stats = engine.host.stats()
    report["rss_mb"] = process.memory_info().rss / 2**20
    report["host_bytes"] = stats.bytes
    report["host_budget"] = stats.budget_bytes
    report["device_slots"] = args.slots
    report["resident_max_ok"] = len(engine.slots.resident("adapter")) <= args.slots
    engine.shutdown()
    return report


def _drive(engine, texts: list[str], clients: int, sampling) -> tuple[list, float]:
    """`clients` closed-loop threads over `texts`. Returns (TTFT s, E2E s, tokens) per
    request and the wall time."""
    from app.engine.types import GenerationRequest

    timings: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    todo = iter(range(len(texts)))

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            request = GenerationRequest(
                prompt=engine.render_chat([{"role": "user", "content": texts[i]}]),
                route_text=texts[i], sampling=sampling)
            submitted = time.perf_counter()
            first, tokens = None, 0
            for event in engine.submit(request):
                if first is None and event.token_ids:
                    first = time.perf_counter()
                tokens = event.completion_tokens or tokens
                if event.finish_reason not in (None, "length", "stop"):
                    raise RuntimeError(f"request failed: {event.error}")
            with lock:
                timings.append((first - submitted, time.perf_counter() - submitted, tokens))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings, time.perf_counter() - started


def _clear_embeddings(cache: Path) -> None:
    folder = cache / "embeddings"
    if folder.is_dir():
        for file in folder.glob("*.npy"):
            file.unlink()


def _counters(registry) -> dict[str, float]:
    get = registry.get_sample_value
    out = {
        "slot_hit": get("dynamerge_device_slot_lookups_total", {"result": "hit"}),
        "slot_miss": get("dynamerge_device_slot_lookups_total", {"result": "miss"}),
        "device_loads": get("dynamerge_adapter_loads_total", {"tier": "device"}),
        "device_evictions": get("dynamerge_adapter_evictions_total", {"tier": "device"}),
    }
    for tier in ("host", "device"):
        out[f"{tier}_sum"] = get("dynamerge_adapter_load_seconds_sum", {"tier": tier})
        out[f"{tier}_count"] = get("dynamerge_adapter_load_seconds_count", {"tier": tier})
    return {k: v or 0.0 for k, v in out.items()}


def _mean_ms(delta: dict[str, float], tier: str) -> float:
    count = delta.get(f"{tier}_count", 0.0)
    return 1000 * delta.get(f"{tier}_sum", 0.0) / count if count else float("nan")


# --- the parent: stores, processes, table, plot -------------------------------------------
def _store(size: int) -> Path:
    """The synthetic store of `size` adapters, written once under bench/out."""
    from adapters.zoo.synth import synth_zoo
    from app.engine.base_model import base_model_path
    from app.settings import Settings

    path = OUT / f"synth-{size}"
    done = path / ".complete"
    if not done.is_file():
        synth_zoo(base_model_path(Settings()), path, size)
        done.write_text("ok\n")
    return path


def _run_child(args: argparse.Namespace, store: Path, cache: Path) -> dict:
    command = [sys.executable, __file__, "--child", "--store", str(store), "--cache", str(cache),
               "--requests", str(args.requests), "--clients", str(args.clients),
               "--max-tokens", str(args.max_tokens), "--slots", str(args.slots),
               "--host-bytes", str(args.host_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the run on {store.name} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(reports: dict[int, dict]) -> str:
    base = min(reports)
    lines = [
        "| store | traffic | tok/s | ratio to 6 | TTFT p50 / p95 (ms) | slot hit rate | "
        "loads/s | evictions/s | disk->host (ms) | host->device (ms) |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size, report in sorted(reports.items()):
        for law in ("zipf", "uniform"):
            r = report[law]
            ratio = r["tokens_per_s"] / reports[base][law]["tokens_per_s"]
            lines.append(
                f"| {size} | {law} | {r['tokens_per_s']:.1f} | {ratio:.2f} | "
                f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {r['slot_hit_rate']:.2f} | "
                f"{r['loads_per_s']:.2f} | {r['evictions_per_s']:.2f} | "
                f"{r['host_load_ms']:.1f} | {r['device_load_ms']:.1f} |")
    lines += ["", "| store | start-up cold (s) | warm (s) | RSS (MB) | host tier (MB, budget) | "
              "device slots |", "|--:|--:|--:|--:|--:|--:|"]
    for size, r in sorted(reports.items()):
        lines.append(f"| {size} | {r['startup_cold_s']:.1f} | {r['startup_warm_s']:.1f} | "
                     f"{r['rss_mb']:.0f} | {r['host_bytes'] / 2**20:.0f} "
                     f"({r['host_budget'] / 2**20:.0f}) | {r['device_slots']} |")
    return "\n".join(lines)


def _targets(reports: dict[int, dict]) -> list[str]:
    base, top = min(reports), max(reports)
    ratio = reports[top]["zipf"]["tokens_per_s"] / reports[base]["zipf"]["tokens_per_s"]
    extra = reports[top]["startup_warm_s"] - reports[base]["startup_warm_s"]
    within = all(r["host_bytes"] <= r["host_budget"] and r["resident_max_ok"]
                 for r in reports.values())
    return [
        f"{top} adapters, Zipf: {ratio:.2f} x the {base}-adapter throughput (target >= 0.9): "
        f"{'met' if ratio >= 0.9 else 'MISSED'}",
        f"warm start-up, {top} vs {base} adapters: +{extra:.1f} s (target <= 15 s): "
        f"{'met' if extra <= 15 else 'MISSED'}",
        f"memory within the configured budgets (host tier, device slots): "
        f"{'met' if within else 'MISSED'}",
    ]


def _plot(reports: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(reports)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for law, marker in (("zipf", "o-"), ("uniform", "s--")):
        axes[0].plot(sizes, [reports[s][law]["tokens_per_s"] for s in sizes], marker, label=law)
        axes[1].plot(sizes, [reports[s][law]["slot_hit_rate"] for s in sizes], marker, label=law)
        axes[2].plot(sizes, [reports[s][law]["ttft_p95_ms"] for s in sizes], marker, label=law)
    for ax, title in zip(axes, ("aggregate tokens/s", "device-slot hit rate", "TTFT p95 (ms)"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("adapters in the store")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("dynamerge: stores larger than the device")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, nargs="+", default=[6, 100, 1000])
    parser.add_argument("--requests", type=int, default=160, help="per store and traffic law")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16, help="DYNAMERGE_MAX_ADAPTERS")
    parser.add_argument("--host-bytes", type=int, default=1 << 30,
                        help="DYNAMERGE_HOST_ADAPTER_BYTES")
    parser.add_argument("--out", type=Path, default=OUT / "scale.png")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    from tqdm.auto import tqdm

    reports = {}
    with tempfile.TemporaryDirectory(prefix="dynamerge-scale-") as scratch:
        for size in tqdm(args.stores, desc="stores", unit="store"):
            reports[size] = _run_child(args, _store(size), Path(scratch) / f"cache-{size}")
    print(f"\n{args.clients} clients, {args.requests} requests per store and traffic law, "
          f"{args.max_tokens} tokens each (ignore-EOS), {args.slots} device slots, host tier "
          f"{args.host_bytes / 2**20:.0f} MiB, load avg {os.getloadavg()[0]:.2f}\n")
    print(_table(reports))
    print()
    for line in _targets(reports):
        print(line)
    _plot(reports, args.out)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
