"""Per-request merge methods on the zoo: build cost, cache-hit cost, and what SVD storage loses.

    python -m bench.merge_fidelity                        # demo zoo
    python -m bench.merge_fidelity --zoo micro --limit 4 --ranks 2 4 --accuracy-ranks 4

Three tables, all through the engine's own merge path (`Engine.merging`, `Engine.submit`):

1. Build cost per method, for the top-3 blend the router picks for the first task's first eval
   prompt: the first build (per-adapter preparation + combination + storage), a rebuild once
   preparation is memoised (new weights: a cache miss), the same stored exactly, and a cache hit
   (a lookup: what a repeated request pays), with the stored sizes.
2. SVD fidelity: the relative Frobenius error ||M - M_r||_F / ||M||_F of the merged deltas M
   over every module, for each method that stores through a truncated SVD. M_r is M's best
   rank-r approximation (Eckart-Young), so the error follows from M's singular values alone.
3. Task accuracy: per task, the router's top-3 blend for its first eval prompt, merged with
   `--accuracy-method` and stored exactly or at each `--accuracy-ranks`, answers that task's
   eval prompts; the linear blend (exact in activation space) is the reference row.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

from adapters.fingerprint import FINGERPRINT_LABEL, zoo_fingerprint
from adapters.merge import MERGE_METHODS, CacheStats, get_merge_method
from adapters.virtual import SetContributions
from adapters.zoo.tasks import answers_match
from app.engine.blend import AUTO_MODEL, Blend, blend_for
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, MergeSpec, SamplingParams
from bench.quality import build_engine
from bench.quality_lib import EvalSet, generate, load_eval_sets, token_budget
from router_index.router import RoutingOptions

NON_LINEAR = tuple(m for m in MERGE_METHODS if m != "linear")
HIT_REPEATS = 200


@dataclass(frozen=True)
class BuildCost:
    method: str
    first_s: float  # preparation + combination + storage (server default storage)
    rebuild_s: float  # a new mix of the same set: preparation and set election memoised
    new_set_s: float  # a new set of prepared adapters: the election + combination + storage
    rebuild_svd_s: float  # a new mix stored at rank `--rank` (randomized SVD)
    hit_us: float  # a cache hit
    mbytes: float  # stored size, server default storage
    mbytes_svd: float  # stored size at rank `--rank`
    relative_error: float  # of the default storage
    relative_error_svd: float  # of rank `--rank` storage
    relative_error_half: float | None  # of per-set elections memoised in fp16 (if linear)


@dataclass(frozen=True)
class MergeReport:
    costs: list[BuildCost]
    svd_errors: dict[str, dict[int, float]]  # method -> rank -> relative Frobenius error
    accuracy: dict[str, dict[str, float]] | None  # storage -> task -> exact match in [0, 1]
    cache: CacheStats
    slowdown: list[Slowdown]


def routed_blend(engine: Engine, prompt: str) -> Blend:
    return blend_for(AUTO_MODEL, engine.route(prompt))


def parse_blend(text: str) -> Blend:
    pairs = [part.split("=") for part in text.split(",")]
    return tuple((a.strip(), float(w)) for a, w in pairs)


def top3_blend(engine: Engine, prompt: str) -> Blend:
    """The router's blend; when calibration's sharp temperature leaves fewer than 3 adapters,
    the router's top-3 at the uncalibrated default temperature (0.02), every hit kept."""
    blend = routed_blend(engine, prompt)
    if len(blend) >= 3 or len(engine.adapter_ids()) < 3:
        return blend
    decision = engine.route(prompt, RoutingOptions(top_k=3, threshold=0.0))
    return tuple((a, round(w, 2)) for a, w in blend_for(AUTO_MODEL, decision) if w >= 0.005)


def shifted(blend: Blend, by: float = 0.05) -> Blend:
    """The same adapters with other weights (a different cache key), moving `by` from the first
    adapter to the second."""
    if len(blend) < 2:
        return ((blend[0][0], blend[0][1] - by),)
    (a, wa), (b, wb), *rest = blend
    return ((a, wa - by), (b, wb + by), *rest)


def other_adapter(engine: Engine, blend: Blend) -> str:
    return next(a for a in engine.adapter_ids() if a not in dict(blend))


def build_costs(engine: Engine, blend: Blend, methods: Sequence[str], rank: int
                ) -> list[BuildCost]:
    """Per method: the first build, a new mix of the same set, a new set of already prepared
    adapters (the blend's first adapter swapped for another, after a warm-up that prepared
    it), the same at rank `rank`, and a hit."""
    merging = engine.merging
    extra = other_adapter(engine, blend)
    (first_id, first_w), *rest = blend
    warm_set = ((extra, first_w), *rest)  # prepares `extra`
    # every adapter prepared, the set new
    new_set = ((first_id, first_w), (extra, rest[0][1] if rest else 0.1), *rest[1:])
    rows = []
    for method in tqdm(methods, desc="build cost", unit="method", leave=False):
        spec = MergeSpec(method=method)
        started = time.perf_counter()
        virtual, hit = merging.virtual_for(blend, spec)
        first = time.perf_counter() - started
        assert not hit, f"{method}: the first build was a cache hit"
        started = time.perf_counter()
        merging.virtual_for(shifted(blend), spec)
        rebuild = time.perf_counter() - started
        merging.virtual_for(warm_set, spec)
        started = time.perf_counter()
        merging.virtual_for(new_set, spec)
        new_set_s = time.perf_counter() - started
        svd = MergeSpec(method=method, storage="svd", rank=rank)
        started = time.perf_counter()
        svd_virtual, _ = merging.virtual_for(shifted(blend, 0.1), svd)
        rebuild_svd = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(HIT_REPEATS):
            _, hit = merging.virtual_for(blend, spec)
            assert hit, f"{method}: a repeated request missed the cache"
        hit_us = 1e6 * (time.perf_counter() - started) / HIT_REPEATS
        rows.append(BuildCost(method, first, rebuild, new_set_s, rebuild_svd, hit_us,
                              virtual.nbytes() / 2**20, svd_virtual.nbytes() / 2**20,
                              virtual.relative_error, svd_virtual.relative_error,
                              half_error(engine, blend, method)))
    return rows


def half_error(engine: Engine, blend: Blend, method_name: str) -> float | None:
    """Relative Frobenius error, over all modules, of the merge built from per-set elections
    memoised in scaled fp16 (`DYNAMERGE_MERGE_HALF_SETS`) against float32; None when the
    method has no per-set contributions."""
    method = get_merge_method(method_name)
    params = method.params()
    ids = [a for a, _ in blend]
    weights = torch.tensor([w for _, w in blend], dtype=torch.float32)
    factory = engine.merging.factory
    diff = total = 0.0
    for module in list(dict.fromkeys(m for a in ids for m in engine.store.spec(a).modules)):
        contributions = method.contributions(factory.prepared(method, params, ids, module),
                                             params)
        if contributions is None:
            return None
        exact = SetContributions.pack(contributions).weighted_sum(weights)
        half = SetContributions.pack(contributions, half=True).weighted_sum(weights)
        diff += float((half - exact).double().square().sum())
        total += float(exact.double().square().sum())
    return math.sqrt(diff / total) if total else 0.0


@dataclass(frozen=True)
class Slowdown:
    method: str
    alone_tok_s: float  # a running stream's decode rate, nothing else happening
    during_tok_s: float  # the same stream while a merge (a new set) builds beside it
    build_s: float  # how long that build took, beside the stream


def decode_slowdown(engine: Engine, blend: Blend, method: str, tokens: int) -> Slowdown:
    """Decode rate of a linear-blend stream alone, then while a merge of a new adapter set is
    built in another thread (as a request thread of the server would)."""
    prompt = engine.render_chat([{"role": "user", "content": "Tell me a long story."}])

    def rate() -> float:
        request = GenerationRequest(prompt=prompt, route_text="story", mix=blend,
                                    sampling=SamplingParams(max_tokens=tokens, temperature=0.0,
                                                            ignore_eos=True))
        started = time.perf_counter()
        _, final = engine.submit(request).result()
        return final.completion_tokens / (time.perf_counter() - started)

    rate()  # warm-up
    alone = rate()
    extra = [a for a in engine.adapter_ids() if a not in dict(blend)]
    fresh = tuple((a, 0.3) for a in extra[:3])  # a set no build has seen
    built: list[float] = []

    def build() -> None:
        started = time.perf_counter()
        engine.merging.virtual_for(fresh, MergeSpec(method=method))
        built.append(time.perf_counter() - started)

    thread = threading.Thread(target=build)
    thread.start()
    during = rate()
    thread.join()
    return Slowdown(method, alone, during, built[0])


def svd_errors(
    engine: Engine, blend: Blend, methods: Sequence[str], ranks: Sequence[int]
) -> dict[str, dict[int, float]]:
    """Relative Frobenius error of rank-r storage, per method and rank, over all modules."""
    factory = engine.merging.factory
    ids = [a for a, _ in blend]
    weights = torch.tensor([w for _, w in blend], dtype=torch.float32)
    modules = list(dict.fromkeys(m for a in ids for m in engine.store.spec(a).modules))
    errors: dict[str, dict[int, float]] = {}
    for method_name in tqdm(methods, desc="svd fidelity", unit="method", leave=False):
        method = get_merge_method(method_name)
        params = method.params()
        tail = dict.fromkeys(ranks, 0.0)
        total = 0.0
        for module in modules:
            prepared = factory.prepared(method, params, ids, module)
            merged = method.combine(prepared, weights, params)
            energy = torch.linalg.svdvals(merged.double()).square()
            total += float(energy.sum())
            for r in ranks:
                tail[r] += float(energy[r:].sum())
        errors[method_name] = {r: math.sqrt(tail[r] / total) if total else 0.0 for r in ranks}
    return errors


def accuracy_rows(
    engine: Engine, eval_sets: dict[str, EvalSet], method: str, ranks: Sequence[int],
) -> dict[str, dict[str, float]]:
    """Exact match per storage ("linear" reference, "exact", "svd@r") and task."""
    blends = {t: routed_blend(engine, s.prompts[0]) for t, s in eval_sets.items()}
    specs = {"linear": MergeSpec(), "exact": MergeSpec(method=method, storage="exact")}
    specs |= {f"svd@{r}": MergeSpec(method=method, storage="svd", rank=r) for r in ranks}
    budgets = {t: token_budget(engine, s.answers, None) for t, s in eval_sets.items()}
    table: dict[str, dict[str, float]] = {}
    for name, spec in tqdm(specs.items(), desc="accuracy", unit="row", leave=False):
        requests = [
            GenerationRequest(
                prompt=engine.render_chat([{"role": "user", "content": p}]), route_text=p,
                mix=blends[t], merge=spec,
                sampling=SamplingParams(max_tokens=budgets[t], temperature=0.0),
            )
            for t, s in eval_sets.items() for p in s.prompts
        ]
        answers = iter(generate(engine, requests, name, progress=False))
        table[name] = {
            t: sum(answers_match(t, next(answers).text, a) for a in s.answers) / len(s.answers)
            for t, s in eval_sets.items()
        }
    return table


def print_build_costs(rows: list[BuildCost], blend: Blend, storage: str, rank: int) -> None:
    mix = ", ".join(f"{a}={w:.2f}" for a, w in blend)
    print(f"\n## Build cost per method (blend {mix}; default storage {storage})\n")
    print(f"| method | first build (s) | new mix (s) | new set (s) | new mix @{rank} (s) "
          f"| cache hit (µs) | size (MB) | size @{rank} (MB) | rel. error | "
          f"rel. error @{rank} | rel. error fp16 sets |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        half = "" if r.relative_error_half is None else f"{r.relative_error_half:.1e}"
        print(f"| {r.method} | {r.first_s:.2f} | {r.rebuild_s:.2f} | {r.new_set_s:.2f} "
              f"| {r.rebuild_svd_s:.2f} | {r.hit_us:.0f} | {r.mbytes:.1f} | {r.mbytes_svd:.1f} "
              f"| {r.relative_error:.4f} | {r.relative_error_svd:.4f} | {half} |")


def print_slowdown(rows: list[Slowdown]) -> None:
    print("\n## Decode rate of a running stream while a merge builds beside it\n")
    print("| method | alone (tok/s) | during a build (tok/s) | ratio | build beside it (s) |")
    print("|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r.method} | {r.alone_tok_s:.1f} | {r.during_tok_s:.1f} "
              f"| {r.during_tok_s / r.alone_tok_s:.2f} | {r.build_s:.2f} |")


def print_svd_errors(errors: dict[str, dict[int, float]], ranks: Sequence[int]) -> None:
    print("\n## Relative Frobenius error of rank-r storage, all modules\n")
    print("| method | " + " | ".join(f"r={r}" for r in ranks) + " |")
    print("|---|" + "--:|" * len(ranks))
    for method, by_rank in errors.items():
        print(f"| {method} | " + " | ".join(f"{by_rank[r]:.4f}" for r in ranks) + " |")


def print_accuracy(table: dict[str, dict[str, float]], method: str) -> None:
    tasks = list(next(iter(table.values())))
    print(f"\n## Exact match (%) of each task's routed top-3 blend, {method} by storage\n")
    print("| storage | " + " | ".join(tasks) + " | avg | Δ vs exact |")
    print("|---|" + "--:|" * (len(tasks) + 2))
    exact = sum(table["exact"].values()) / len(tasks)
    for name, row in table.items():
        avg = sum(row.values()) / len(tasks)
        label = "linear (activation space)" if name == "linear" else name
        delta = "" if name in ("linear", "exact") else f"{100 * (avg - exact):+.1f}"
        print(f"| {label} | " + " | ".join(f"{100 * row[t]:.1f}" for t in tasks)
              + f" | {100 * avg:.1f} | {delta} |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_fidelity",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=["demo", "micro"], default="demo")
    parser.add_argument("--methods", nargs="+", choices=NON_LINEAR, default=list(NON_LINEAR))
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128],
                        help="ranks of the SVD fidelity table")
    parser.add_argument("--blend", default=None,
                        help="the build-cost blend as id=weight,...; default: the router's "
                             "blend for the first task's first eval prompt, widened to the "
                             "top-3 at the uncalibrated temperature if calibration leaves fewer")
    parser.add_argument("--rank", type=int, default=64, help="rank of the svd storage column")
    parser.add_argument("--slowdown-methods", nargs="*", choices=NON_LINEAR,
                        default=["ties", "neuro"],
                        help="methods whose build runs beside a decoding stream (none: skip)")
    parser.add_argument("--slowdown-tokens", type=int, default=64)
    parser.add_argument("--accuracy-method", choices=NON_LINEAR, default="ties")
    parser.add_argument("--accuracy-ranks", type=int, nargs="*", default=[8, 16, 32, 64],
                        help="ranks of the accuracy table (none: skip it)")
    parser.add_argument("--limit", type=int, default=32, help="eval prompts per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's torch threads (default: the engine's own)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> MergeReport:
    """Run the benchmark, print its tables (Markdown) and return what it measured."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dynamerge-merge-") as workdir:
        # Table 3 holds one exactly stored merge per task at once (~0.3 GB each on the demo).
        engine = build_engine(args.zoo, args.batch_size, Path(workdir), args.threads,
                              merge_cache_bytes=8 << 30)
        try:
            store = Path(engine.settings.adapter_store)
            tasks = [a for a in engine.adapter_ids() if (store / a / "eval.jsonl").is_file()]
            eval_sets = load_eval_sets(store, tasks, args.limit)
            blend = (parse_blend(args.blend) if args.blend
                     else top3_blend(engine, eval_sets[tasks[0]].prompts[0]))
            started = time.perf_counter()
            first_module = next(iter(engine.store.spec(tasks[0]).modules))
            engine.merging.task_inputs(tasks[:1], first_module)
            collect_s = time.perf_counter() - started
            costs = build_costs(engine, blend, args.methods, args.rank)
            slowdown = [decode_slowdown(engine, blend, m, args.slowdown_tokens)
                        for m in tqdm(args.slowdown_methods, desc="slowdown", leave=False)]
            svd_methods = [m for m in args.methods if m != "twin"]  # Twin is stored exactly
            errors = svd_errors(engine, blend, svd_methods, args.ranks)
            accuracy = (accuracy_rows(engine, eval_sets, args.accuracy_method,
                                      args.accuracy_ranks) if args.accuracy_ranks else None)
            stats = engine.merging.cache.stats()
            settings = engine.settings
        finally:
            engine.shutdown()
    print(f"# python -m bench.merge_fidelity {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"zoo={args.zoo} ({FINGERPRINT_LABEL} `{zoo_fingerprint(store)}`), "
          f"device={engine.device}, dtype={engine.dtype}, "
          f"{engine.threads} torch threads, {len(tasks)} adapters, "
          f"{len(engine.layers)} blended modules; "
          f"TE exemplar activations collected once in {collect_s:.2f} s")
    print_build_costs(costs, blend, settings.merge_storage, args.rank)
    if slowdown:
        print_slowdown(slowdown)
    print_svd_errors(errors, args.ranks)
    if accuracy is not None:
        print_accuracy(accuracy, args.accuracy_method)
    print(f"\ncache: {stats.hits} hits, {stats.misses} misses, {stats.evictions} evictions, "
          f"{stats.build_seconds:.1f} s building, {stats.bytes_used / 2**20:.0f} MiB held")
    return MergeReport(costs, errors, accuracy, stats, slowdown)


if __name__ == "__main__":
    main()
