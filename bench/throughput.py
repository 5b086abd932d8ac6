"""Throughput and latency of dynamerge against the plain base model and naive per-request merging.

    python bench/throughput.py                                   # demo zoo, defaults
    python bench/throughput.py --zoo micro --requests 16 --max-tokens 16

Three systems, each at 1, 4 and 16 concurrent clients, measured in one run on one machine:

- base:    the engine with model="base". Same scheduler, same batching, no LoRA work at all.
- dynamic: the engine with model="auto": every request is routed (top-K) and decoded with
           its own adapter mix, rows with different mixes sharing each forward pass.
- naive:   what a user without dynamerge would do with PEFT, one request at a time (a lock):
           add_weighted_adapter(cat) with the weights our router picks, merge_adapter,
           HF `generate` (greedy), unmerge_adapter, delete_adapter.

Clients are threads; each takes the next prompt (held-out eval prompts of every task,
interleaved, so concurrent requests get different mixes), submits it and reads its stream.
TTFT = first token event - submit, TPOT = (last event - first event) / (tokens - 1),
E2E = last event - submit, all client-side. Aggregate tokens/s = generated tokens / wall time
of the level. Like vLLM's benchmarks we ignore EOS by default (`--no-ignore-eos` to stop), so
every request of every system generates exactly --max-tokens tokens; tokens/s always counts
the tokens actually generated.

Writes a PNG (default bench/out/throughput.png) and prints the table and the target ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PEFT warns on every delete of the active mix adapter; transformers on deprecations.
warnings.filterwarnings("ignore", category=UserWarning, module="peft")
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from adapters.blend import AUTO_MODEL, BASE_MODEL, blend_for  # noqa: E402
from app.engine.base_model import base_model_path  # noqa: E402
from app.engine.engine import Engine  # noqa: E402
from app.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from app.settings import Settings  # noqa: E402

SYSTEMS = ("base", "dynamic", "naive")
# (name, numerator, denominator, target): numerator / denominator of aggregate tokens/s.
TARGETS = (
    ("dynamic / base @1", ("dynamic", 1), ("base", 1), 0.85),
    ("dynamic / base @16", ("dynamic", 16), ("base", 16), 0.80),
    ("dynamic / naive @16", ("dynamic", 16), ("naive", 16), 10.0),
    ("dynamic @16 / dynamic @1", ("dynamic", 16), ("dynamic", 1), 6.0),
)


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message, also what the router embeds
    rendered: str  # through the chat template
    task: str  # the adapter whose eval split it comes from


@dataclass(frozen=True)
class Timing:
    submitted: float
    first: float  # first token event
    done: float  # last event
    tokens: int
    text: str  # for the dynamic-vs-naive agreement check


@dataclass(frozen=True)
class LevelResult:
    system: str
    concurrency: int
    timings: list[Timing]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ms(self, what: str) -> np.ndarray:
        if what == "ttft":
            values = [t.first - t.submitted for t in self.timings]
        elif what == "tpot":
            values = [(t.done - t.first) / (t.tokens - 1) for t in self.timings if t.tokens > 1]
        else:
            values = [t.done - t.submitted for t in self.timings]
        return 1000 * np.asarray(values or [float("nan")])


class BenchEngine(Engine):
    """The engine, optionally blind to EOS so that every request generates max_tokens."""

    def __init__(self, settings: Settings, ignore_eos: bool) -> None:
        super().__init__(settings)
        self.ignore_eos = ignore_eos

    def _eos_ids(self) -> frozenset[int]:
        return frozenset() if self.ignore_eos else super()._eos_ids()


def engine_client(engine: Engine, model: str, max_tokens: int) -> Callable[[Prompt], Timing]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def run(prompt: Prompt) -> Timing:
        request = GenerationRequest(
            prompt=prompt.rendered, route_text=prompt.text, model=model, sampling=sampling
        )
        submitted = time.perf_counter()
        first, parts = None, []
        for event in engine.submit(request):
            now = time.perf_counter()
            if first is None and event.token_ids:
                first = now
            parts.append(event.text)
        return Timing(submitted, first or now, now, event.completion_tokens, "".join(parts))

    return run


class _Clock:
    """A `generate` streamer that only timestamps tokens (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(i) for i in value.reshape(-1))

    def end(self) -> None:
        pass


class NaiveMerge:
    """Per-request PEFT merging, serialised by a lock, with the engine's router for the weights."""

    MIX = "bench-mix"

    def __init__(self, engine: Engine, settings: Settings, ignore_eos: bool) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.engine = engine
        self.tokenizer = engine.tokenizer
        path = base_model_path(settings)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=engine.dtype)
        model = model.to(engine.device).eval()
        ids = engine.adapter_ids()
        store = settings.adapter_store
        self.model = PeftModel.from_pretrained(model, store / ids[0], adapter_name=ids[0])
        for adapter_id in ids[1:]:
            self.model.load_adapter(store / adapter_id, adapter_name=adapter_id)
        self.model.eval()
        self.lock = threading.Lock()
        # eos_token_id=None makes generate ignore EOS, as the engine does with ignore_eos.
        self.eos = None if ignore_eos else sorted(engine.eos_ids)

    def client(self, max_tokens: int) -> Callable[[Prompt], Timing]:
        def run(prompt: Prompt) -> Timing:
            submitted = time.perf_counter()
            blend = blend_for(AUTO_MODEL, self.engine.router.route(prompt.text))
            ids = self.tokenizer(prompt.rendered, add_special_tokens=False)["input_ids"]
            input_ids = torch.tensor([ids], device=self.engine.device)
            clock = _Clock()
            with self.lock, torch.inference_mode():
                if blend:
                    self._merge(blend)
                try:
                    with self._adapters(enabled=bool(blend)):
                        self.model.generate(
                            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_tokens, do_sample=False, streamer=clock,
                            eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                        )
                finally:
                    if blend:
                        self.model.unmerge_adapter()
                        self.model.delete_adapter(self.MIX)
            done = time.perf_counter()
            first = clock.times[0] if clock.times else done
            text = self.tokenizer.decode(clock.ids, skip_special_tokens=True)
            return Timing(submitted, first, done, len(clock.ids), text)

        return run

    def _merge(self, blend: tuple[tuple[str, float], ...]) -> None:
        names, weights = [a for a, _ in blend], [w for _, w in blend]
        self.model.add_weighted_adapter(names, weights, self.MIX, combination_type="cat")
        if self.model.peft_config[names[0]].use_rslora and len(names) > 1:
            # PEFT copies use_rslora from the first adapter into the cat adapter, whose scaling
            # must be 1 (it is already folded into A): undo alpha / sqrt(r).
            for module in self.model.modules():
                scaling = getattr(module, "scaling", None)
                if isinstance(scaling, dict) and self.MIX in scaling:
                    scaling[self.MIX] = 1.0
        self.model.set_adapter(self.MIX)
        self.model.merge_adapter()

    def _adapters(self, enabled: bool):
        from contextlib import nullcontext

        return nullcontext() if enabled else self.model.disable_adapter()


def load_prompts(engine: Engine, store: Path) -> list[Prompt]:
    """Held-out prompts of every adapter, interleaved task by task."""
    per_task = []
    for task in engine.adapter_ids():
        path = store / task / "eval.jsonl"
        if path.exists():
            texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
        else:
            texts = list(engine.store.spec(task).exemplars)
        per_task.append([(task, text) for text in texts])
    interleaved = [item for group in zip(*per_task, strict=False) for item in group]
    return [
        Prompt(text, engine.render_chat([{"role": "user", "content": text}]), task)
        for task, text in interleaved
    ]


def run_level(
    system: str,
    run: Callable[[Prompt], Timing],
    prompts: list[Prompt],
    concurrency: int,
    requests: int,
) -> LevelResult:
    """`requests` requests from `concurrency` closed-loop client threads."""
    todo = iter(range(requests))
    todo_lock = threading.Lock()
    timings: list[tuple[int, Timing]] = []
    errors: list[BaseException] = []
    bar = tqdm(total=requests, desc=f"{system:>7} @{concurrency:<2}", unit="req", leave=False)

    def client() -> None:
        while True:
            with todo_lock:
                i = next(todo, None)
            if i is None or errors:
                return
            try:
                timing = run(prompts[i % len(prompts)])
            except BaseException as error:  # surfaced in the main thread below
                errors.append(error)
                return
            with todo_lock:
                timings.append((i, timing))
                bar.update()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    bar.close()
    if errors:
        raise errors[0]
    return LevelResult(system, concurrency, [t for _, t in sorted(timings)], wall)


def _p(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def print_table(results: list[LevelResult]) -> None:
    head = (
        f"{'system':<8}{'conc':>5}{'reqs':>6}{'tok/req':>8}{'tok/s':>9}"
        f"{'TTFT p50':>10}{'p95':>8}{'TPOT p50':>10}{'p95':>8}{'E2E p50':>10}{'p95':>8}"
    )
    print(head + "   (latencies in ms)")
    print("-" * len(head))
    for r in results:
        ttft, tpot, e2e = r.ms("ttft"), r.ms("tpot"), r.ms("e2e")
        print(
            f"{r.system:<8}{r.concurrency:>5}{len(r.timings):>6}"
            f"{r.tokens / len(r.timings):>8.1f}{r.tokens_per_s:>9.1f}"
            f"{_p(ttft, 50):>10.1f}{_p(ttft, 95):>8.1f}{_p(tpot, 50):>10.1f}{_p(tpot, 95):>8.1f}"
            f"{_p(e2e, 50):>10.0f}{_p(e2e, 95):>8.0f}"
        )


def print_targets(results: list[LevelResult]) -> None:
    found = {(r.system, r.concurrency): r for r in results}
    print(f"\n{'ratio of aggregate tokens/s':<28}{'measured':>10}{'target':>9}  verdict")
    for name, top, bottom, target in TARGETS:
        if top not in found or bottom not in found:
            continue
        ratio = found[top].tokens_per_s / found[bottom].tokens_per_s
        verdict = "met" if ratio >= target else "MISSED"
        print(f"{name:<28}{ratio:>10.2f}{'>= ' + str(target):>9}  {verdict}")


def print_agreement(results: list[LevelResult], prompts_count: int) -> None:
    """Greedy outputs of dynamic and naive should match: same weights, same maths."""
    outputs: dict[str, dict[int, str]] = {}
    for r in results:
        for i, t in enumerate(r.timings):
            outputs.setdefault(r.system, {})[i % prompts_count] = t.text
    both = outputs.get("dynamic", {}).keys() & outputs.get("naive", {}).keys()
    if both:
        same = sum(outputs["dynamic"][i] == outputs["naive"][i] for i in both)
        print(f"\ngreedy outputs identical, dynamic vs naive: {same}/{len(both)} prompts")


def plot(results: list[LevelResult], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("aggregate tokens/s", lambda r: r.tokens_per_s),
        ("TTFT p50 (ms)", lambda r: _p(r.ms("ttft"), 50)),
        ("TPOT p50 (ms)", lambda r: _p(r.ms("tpot"), 50)),
        ("end-to-end p95 (ms)", lambda r: _p(r.ms("e2e"), 95)),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (label, value) in zip(axes, panels, strict=True):
        for system in SYSTEMS:
            rows = [r for r in results if r.system == system]
            if rows:
                ax.plot([r.concurrency for r in rows], [value(r) for r in rows], "o-", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def make_settings(zoo: str, scratch: Path) -> Settings:
    if zoo == "micro":
        from adapters.zoo.micro import build_micro_zoo

        micro = build_micro_zoo(scratch / "micro")
        return Settings(
            base_model=micro.base_dir, adapter_store=micro.store_dir, cache_dir=scratch / "cache"
        )
    if zoo == "demo-random":
        return random_demo_zoo(scratch / "adapters")
    settings = Settings()
    from adapters.registry import list_store

    if not list_store(settings.adapter_store):
        raise SystemExit(
            f"no adapters in {settings.adapter_store}: train the demo zoo, or use --zoo "
            "demo-random (same shapes, random weights) or --zoo micro"
        )
    return settings


def random_demo_zoo(store: Path) -> Settings:
    """The demo base plus six random adapters of the demo's shape (rank, alpha, targets).

    Speed depends on shapes, not on trained values, so this measures what the trained demo zoo
    would give, before training has finished. Exemplars and eval prompts are the demo's own.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.zoo.tasks import TASKS, make_splits
    from adapters.zoo.train import N_EVAL, N_EXEMPLARS, TrainConfig

    settings = Settings(adapter_store=store)
    cfg = TrainConfig()
    model = AutoModelForCausalLM.from_pretrained(base_model_path(settings))
    for seed, task in enumerate(TASKS):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
            init_lora_weights=False, lora_dropout=0.0,
        )
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(store / task, save_embedding_layers=False)
        model = peft_model.unload()
        splits = make_splits(task, 0, N_EXEMPLARS, N_EVAL)
        for name, rows in (
            ("exemplars.jsonl", [{"text": ex.prompt} for ex in splits.exemplars]),
            ("eval.jsonl", [{"prompt": ex.prompt, "answer": ex.answer} for ex in splits.eval]),
        ):
            (store / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=["demo", "demo-random", "micro"], default="demo",
                        help="demo: Settings() (DYNAMERGE_* env); demo-random: the demo base "
                             "with six random adapters of the demo's shapes; micro: a tiny "
                             "random zoo")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16],
                        help="concurrent clients (default: 1 4 16)")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per system and level (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--top-k", type=int, default=3, help="adapters blended per request")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's torch intra-op threads (default: the engine's own, "
                             "DYNAMERGE_TORCH_THREADS or half the cores)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="stop at EOS (tokens/s then counts the tokens actually generated)")
    default_out = Path(__file__).parent / "out" / "throughput.png"
    parser.add_argument("--out", type=Path, default=default_out,
                        help="plot path (default: bench/out/throughput.png)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dynamerge-bench-") as scratch:
        settings = make_settings(args.zoo, Path(scratch))
        settings = settings.model_copy(update={
            "top_k": args.top_k,
            "max_batch_size": max(settings.max_batch_size, max(args.levels)),
            "max_queue": max(settings.max_queue, max(args.levels)),
            "torch_threads": args.threads or settings.torch_threads,
        })
        engine = BenchEngine(settings, ignore_eos=args.ignore_eos)
        engine.load(show_progress=False)
        try:
            prompts = load_prompts(engine, settings.adapter_store)
            clients = {
                "base": engine_client(engine, BASE_MODEL, args.max_tokens),
                "dynamic": engine_client(engine, AUTO_MODEL, args.max_tokens),
            }
            if "naive" in args.systems:
                clients["naive"] = NaiveMerge(engine, settings, args.ignore_eos).client(
                    args.max_tokens
                )
            results = measure(args, clients, prompts)
        finally:
            engine.shutdown()
    mixes = {blend_for(AUTO_MODEL, engine.router.route(p.text)) for p in prompts[: args.requests]}
    print(
        f"\nzoo={args.zoo} ({len(engine.adapter_ids())} adapters), device={engine.device}, "
        f"dtype={engine.dtype}, torch threads={engine.threads}, "
        f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}\n"
        f"{args.requests} requests per level, {args.max_tokens} max tokens, greedy, "
        f"top_k={args.top_k}, ignore_eos={args.ignore_eos}, "
        f"{len(mixes)} distinct adapter mixes among the prompts\n"
    )
    print_table(results)
    print_targets(results)
    print_agreement(results, len(prompts))
    plot(results, args.out, f"dynamerge throughput ({args.zoo} zoo, {engine.device})")
    print(f"\nplot: {args.out}")


def measure(
    args: argparse.Namespace, clients: dict[str, Callable[[Prompt], Timing]], prompts: list[Prompt]
) -> list[LevelResult]:
    """Warm every system up, then run level by level (systems side by side in time)."""
    systems = [s for s in SYSTEMS if s in args.systems]
    for system in systems:
        run_level(system + "*", clients[system], prompts, 2, 2)  # warm-up, discarded
    results = []
    for level in args.levels:
        for system in systems:
            results.append(run_level(system, clients[system], prompts, level, args.requests))
    return results


if __name__ == "__main__":
    main()
