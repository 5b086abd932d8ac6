"""Throughput and latency of dynamerge against the plain base model and naive per-request merging.

    python bench/throughput.py                                   # demo zoo, every workload
    python bench/throughput.py --zoo micro --requests 16 --max-tokens 16
    python bench/throughput.py --workloads real_eos --systems base dynamic --levels 1 8

Three systems, measured in one run on one machine, at each level of concurrent clients:

- base:    the engine with model="base". Same scheduler, same batching, no LoRA work at all.
- dynamic: the engine with model="auto": every request is routed (top-K) and decoded with
           its own adapter mix, rows with different mixes sharing each forward pass.
- naive:   what a user without dynamerge would do with PEFT, one request at a time (a lock):
           add_weighted_adapter(cat) with the weights our router picks, merge_adapter,
           HF `generate` (greedy), unmerge_adapter, delete_adapter.

Three workloads, because a benchmark that only ignores EOS flatters:

- ignore_eos:  vLLM's convention: every request generates exactly --max-tokens tokens.
- real_eos:    requests stop where the model stops (the demo's answers are 3-14 tokens): real
               traffic of short answers is mostly prefill.
- long_prompt: real EOS behind a ~500-token system prompt, as chat applications send.
- multi_turn:  real EOS, conversations of MULTI_TURNS turns: each turn resends the history
               (earlier replies as text, as chat clients do) plus a follow-up question, so
               the prefix cache serves the earlier turns; one "request" of a level is one
               conversation, its turns counted one by one (base and dynamic only).

Clients are threads in a closed loop (a new request the moment one ends, so requests join
all the time); each takes the next prompt (held-out eval prompts of every task, interleaved,
so concurrent requests get different mixes). TTFT = first token event - submit, TPOT = (last
event - first event) / (tokens - 1), E2E = last event - submit, all client-side. Aggregate
tokens/s = generated tokens / wall time of the level.

Writes a PNG (default bench/out/throughput.png) and prints a table per workload and the
target ratios.
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

from app.engine.base_model import base_model_path  # noqa: E402
from app.engine.blend import AUTO_MODEL, BASE_MODEL, blend_for  # noqa: E402
from app.engine.engine import Engine  # noqa: E402
from app.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from app.metrics import FORWARD_SECONDS  # noqa: E402
from app.settings import Settings  # noqa: E402

SYSTEMS = ("base", "dynamic", "naive")


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
    workload: str
    system: str
    concurrency: int
    timings: list[Timing]
    wall_s: float
    # Seconds the engine spent in model forwards during the level, by phase (naive: none).
    forward_s: dict[str, float]

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


@dataclass(frozen=True)
class Workload:
    name: str
    ignore_eos: bool
    system_prompt: bool  # behind LONG_SYSTEM_PROMPT
    turns: int = 1  # > 1: each request is a conversation of this many turns


WORKLOADS = {
    "ignore_eos": Workload("ignore_eos", ignore_eos=True, system_prompt=False),
    "real_eos": Workload("real_eos", ignore_eos=False, system_prompt=False),
    "long_prompt": Workload("long_prompt", ignore_eos=False, system_prompt=True),
    "multi_turn": Workload("multi_turn", ignore_eos=False, system_prompt=False, turns=5),
}
MULTI_TURNS = WORKLOADS["multi_turn"].turns
FOLLOW_UPS = ["Can you explain that?", "Say it another way.", "Is that right?",
              "One more time, briefly.", "Thanks. Anything else?"]
_POLICY = (
    "You are the assistant of a small online shop that sells books, games and stationery. "
    "Answer the customer's question directly and briefly. Be polite, never invent order "
    "numbers, prices or delivery dates, and never promise refunds: say that a colleague will "
    "check. Orders ship within two working days; tracking links arrive by e-mail. Returns "
    "are accepted within thirty days when the item is unused and in its packaging. Gift "
    "cards cannot be exchanged for cash. We do not store card numbers. If the customer asks "
    "for something outside the shop, help anyway if you can, in the same brief style. "
)
LONG_SYSTEM_PROMPT = _POLICY * 5  # ~500 tokens with SmolLM2's tokenizer


def engine_client(engine: Engine, model: str, max_tokens: int,
                  ignore_eos: bool) -> Callable[[Prompt], Timing]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)

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


def conversation_client(engine: Engine, model: str, max_tokens: int, turns: int
                        ) -> Callable[[Prompt], list[Timing]]:
    """A client that runs a whole conversation per prompt; one Timing per turn."""
    single = engine_client(engine, model, max_tokens, ignore_eos=False)

    def run(prompt: Prompt) -> list[Timing]:
        history = [{"role": "user", "content": prompt.text}]
        out = []
        for turn in range(turns):
            timing = single(Prompt(prompt.text, engine.render_chat(history), prompt.task))
            out.append(timing)
            history += [{"role": "assistant", "content": timing.text},
                        {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
        return out

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

    def __init__(self, engine: Engine, settings: Settings) -> None:
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

    def client(self, max_tokens: int, ignore_eos: bool) -> Callable[[Prompt], Timing]:
        # eos_token_id=None makes generate ignore EOS, as the engine does with ignore_eos.
        eos = None if ignore_eos else sorted(self.engine.eos_ids)

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
                            eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
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


def load_prompts(engine: Engine, store: Path, system_prompt: str | None = None) -> list[Prompt]:
    """Held-out prompts of every adapter, interleaved task by task (behind a system prompt
    when one is given)."""
    per_task = []
    for task in engine.adapter_ids():
        path = store / task / "eval.jsonl"
        if path.exists():
            texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
        else:
            texts = list(engine.store.spec(task).exemplars)
        per_task.append([(task, text) for text in texts])
    interleaved = [item for group in zip(*per_task, strict=False) for item in group]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        Prompt(text, engine.render_chat([*system, {"role": "user", "content": text}]), task)
        for task, text in interleaved
    ]


def run_level(
    workload: str,
    system: str,
    run: Callable[[Prompt], Timing | list[Timing]],
    prompts: list[Prompt],
    concurrency: int,
    requests: int,
) -> LevelResult:
    """`requests` requests from `concurrency` closed-loop client threads (a client returning
    a list of Timings ran a conversation: each turn counts as one request)."""
    todo = iter(range(requests))
    todo_lock = threading.Lock()
    timings: list[tuple[tuple[int, int], Timing]] = []
    errors: list[BaseException] = []
    bar = tqdm(total=requests, desc=f"{workload} {system:>7} @{concurrency:<2}", unit="req",
               leave=False)

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
                for j, t in enumerate(timing if isinstance(timing, list) else [timing]):
                    timings.append(((i, j), t))
                bar.update()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    before = _forward_seconds()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    forward = {phase: s - before[phase] for phase, s in _forward_seconds().items()}
    bar.close()
    if errors:
        raise errors[0]
    return LevelResult(workload, system, concurrency, [t for _, t in sorted(timings)], wall,
                       forward)


def _forward_seconds() -> dict[str, float]:
    """Total seconds of the engine's forwards so far, by phase (the server's own metric)."""
    totals = {"prefill": 0.0, "decode": 0.0}
    for family in FORWARD_SECONDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum") and sample.labels.get("phase") in totals:
                totals[sample.labels["phase"]] = sample.value
    return totals


def _p(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def print_table(results: list[LevelResult]) -> None:
    head = (
        f"{'system':<8}{'conc':>5}{'reqs':>6}{'tok/req':>8}{'tok/s':>9}"
        f"{'TTFT p50':>10}{'p95':>8}{'TPOT p50':>10}{'p95':>8}{'E2E p50':>10}{'p95':>8}"
        f"{'prefill%':>9}{'decode%':>8}"
    )
    for workload in dict.fromkeys(r.workload for r in results):
        print(f"\n### {workload}   (latencies in ms)\n")
        print(head)
        print("-" * len(head))
        for r in (r for r in results if r.workload == workload):
            ttft, tpot, e2e = r.ms("ttft"), r.ms("tpot"), r.ms("e2e")
            print(
                f"{r.system:<8}{r.concurrency:>5}{len(r.timings):>6}"
                f"{r.tokens / len(r.timings):>8.1f}{r.tokens_per_s:>9.1f}"
                f"{_p(ttft, 50):>10.1f}{_p(ttft, 95):>8.1f}{_p(tpot, 50):>10.1f}"
                f"{_p(tpot, 95):>8.1f}{_p(e2e, 50):>10.0f}{_p(e2e, 95):>8.0f}"
                f"{_share(r, 'prefill'):>9}{_share(r, 'decode'):>8}"
            )


def _share(r: LevelResult, phase: str) -> str:
    """Share of the level's wall time spent in forwards of `phase` ("-" for naive)."""
    seconds = r.forward_s.get(phase, 0.0) if r.system != "naive" else None
    return "-" if seconds is None else f"{100 * seconds / r.wall_s:.0f}"


def targets(results: list[LevelResult]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for every target the run can judge."""
    found = {(r.workload, r.system, r.concurrency): r for r in results}
    levels = sorted({r.concurrency for r in results})
    out = []

    def ratio(name: str, top, bottom, target: float) -> None:
        if top in found and bottom in found:
            value = found[top].tokens_per_s / found[bottom].tokens_per_s
            out.append((name, value, f">= {target:g}", value >= target))

    for workload in ("ignore_eos", "real_eos", "long_prompt"):
        for level in levels:
            ratio(f"{workload}: dynamic / base @{level}", (workload, "dynamic", level),
                  (workload, "base", level), 0.9)
    top = max(levels)
    ratio(f"ignore_eos: dynamic / naive @{top}", ("ignore_eos", "dynamic", top),
          ("ignore_eos", "naive", top), 10.0)
    if 8 in levels:
        ratio("real_eos: dynamic @8 / dynamic @1", ("real_eos", "dynamic", 8),
              ("real_eos", "dynamic", 1), 3.0)
        one, eight = found.get(("real_eos", "dynamic", 1)), found.get(("real_eos", "dynamic", 8))
        if one is not None and eight is not None:
            value = _p(eight.ms("tpot"), 95) / _p(one.ms("tpot"), 50)
            out.append(("real_eos: TPOT p95 @8 / TPOT @1", value, "<= 2", value <= 2.0))
    return out


def print_targets(results: list[LevelResult]) -> None:
    print(f"\n{'target':<40}{'measured':>10}{'target':>9}  verdict")
    for name, value, target, met in targets(results):
        print(f"{name:<40}{value:>10.2f}{target:>9}  {'met' if met else 'MISSED'}")


def print_agreement(results: list[LevelResult], prompts_count: int) -> None:
    """Greedy outputs of dynamic and naive should match: same weights, same maths."""
    outputs: dict[tuple[str, str], dict[int, str]] = {}
    for r in results:
        for i, t in enumerate(r.timings):
            outputs.setdefault((r.workload, r.system), {})[i % prompts_count] = t.text
    for workload in dict.fromkeys(r.workload for r in results):
        dynamic, naive = outputs.get((workload, "dynamic"), {}), outputs.get((workload, "naive"))
        if naive:
            both = dynamic.keys() & naive.keys()
            same = sum(dynamic[i] == naive[i] for i in both)
            print(f"{workload}: greedy outputs identical, dynamic vs naive: {same}/{len(both)}")


def plot(results: list[LevelResult], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("aggregate tokens/s", lambda r: r.tokens_per_s),
        ("TTFT p95 (ms)", lambda r: _p(r.ms("ttft"), 95)),
        ("TPOT p95 (ms)", lambda r: _p(r.ms("tpot"), 95)),
    ]
    workloads = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(workloads), len(panels), figsize=(14, 3.6 * len(workloads)),
                             squeeze=False)
    for row, workload in enumerate(workloads):
        for ax, (label, value) in zip(axes[row], panels, strict=True):
            for system in SYSTEMS:
                rows = [r for r in results if r.system == system and r.workload == workload]
                if rows:
                    ax.plot([r.concurrency for r in rows], [value(r) for r in rows], "o-",
                            label=system)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_title(f"{workload}: {label}")
            ax.grid(alpha=0.3)
        axes[row][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
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
    if zoo == "qwen-random":
        return random_demo_zoo(scratch / "adapters", qwen_shaped_base(scratch / "qwen"), rank=16)
    settings = Settings()
    from adapters.registry import list_store

    if not list_store(settings.adapter_store):
        raise SystemExit(
            f"no adapters in {settings.adapter_store}: train the demo zoo, or use --zoo "
            "demo-random (same shapes, random weights) or --zoo micro"
        )
    return settings


def qwen_shaped_base(out: Path) -> Path:
    """A random model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query and 2 KV heads,
    MLP 4864, tied embeddings), with the demo's tokenizer and chat template (no weights can be
    downloaded here): its vocabulary is the demo's 49,152 tokens, not Qwen's 151,936."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base_model_path(Settings()))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_demo_zoo(store: Path, base: Path | None = None, rank: int | None = None
                    ) -> Settings:
    """The demo base (or `base`) plus six random adapters of the demo's shape (rank, alpha,
    targets; `rank` overrides the rank).

    Speed depends on shapes, not on trained values, so this measures what the trained demo zoo
    would give, before training has finished. Exemplars and eval prompts are the demo's own.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.zoo.tasks import TASKS, make_splits
    from adapters.zoo.train import N_EVAL, N_EXEMPLARS, TrainConfig

    settings = Settings(adapter_store=store, base_model=base)
    cfg = TrainConfig()
    model = AutoModelForCausalLM.from_pretrained(base_model_path(settings))
    for seed, task in enumerate(TASKS):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=rank or cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
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
    parser.add_argument("--zoo", choices=["demo", "demo-random", "qwen-random", "micro"],
                        default="demo",
                        help="demo: Settings() (DYNAMERGE_* env); demo-random: the demo base "
                             "with six random adapters of the demo's shapes; qwen-random: a "
                             "random model of Qwen2.5-0.5B's shape with six random rank-16 "
                             "adapters; micro: a tiny random zoo")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=list(WORKLOADS))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 16],
                        help="concurrent clients (default: 1 8 16)")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per system, workload and level (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request, at most")
    parser.add_argument("--top-k", type=int, default=3, help="adapters blended per request")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--naive-workloads", nargs="+", choices=list(WORKLOADS),
                        default=["ignore_eos"],
                        help="workloads the (slow, serial) naive system runs (default: "
                             "ignore_eos)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's torch intra-op threads, decode included (default: "
                             "the engine's own, DYNAMERGE_TORCH_THREADS / _DECODE_THREADS)")
    parser.add_argument("--prefill-threads", type=int, default=None,
                        help="the engine's torch threads for prefill (default: its setting)")
    parser.add_argument("--step-tokens", type=int, default=None,
                        help="the engine's per-step token budget (default: its setting)")
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
            "decode_threads": args.threads or settings.decode_threads,
            "max_step_tokens": args.step_tokens or settings.max_step_tokens,
            "prefill_threads": args.prefill_threads or settings.prefill_threads,
        })
        engine = Engine(settings)
        engine.load(show_progress=False)
        try:
            naive = NaiveMerge(engine, settings) if "naive" in args.systems else None
            results, counts = [], {}
            for name in args.workloads:
                workload = WORKLOADS[name]
                prompts = load_prompts(engine, settings.adapter_store,
                                       LONG_SYSTEM_PROMPT if workload.system_prompt else None)
                size = len(engine.tokenizer(prompts[0].rendered)["input_ids"])
                if size + args.max_tokens > engine.context_length:
                    print(f"{name}: skipped, {size}-token prompts do not fit the model's "
                          f"{engine.context_length}-token context")
                    continue
                counts[name] = (len(prompts), size)
                clients = {
                    "base": engine_client(engine, BASE_MODEL, args.max_tokens,
                                          workload.ignore_eos),
                    "dynamic": engine_client(engine, AUTO_MODEL, args.max_tokens,
                                             workload.ignore_eos),
                }
                if workload.turns > 1:
                    clients = {system: conversation_client(engine, model, args.max_tokens,
                                                           workload.turns)
                               for system, model in (("base", BASE_MODEL),
                                                     ("dynamic", AUTO_MODEL))}
                elif naive is not None and name in args.naive_workloads:
                    clients["naive"] = naive.client(args.max_tokens, workload.ignore_eos)
                results += measure(args, name, clients, prompts)
        finally:
            engine.shutdown()
    prompts = load_prompts(engine, settings.adapter_store)
    mixes = {blend_for(AUTO_MODEL, engine.router.route(p.text)) for p in prompts[: args.requests]}
    print(
        f"\nzoo={args.zoo} ({len(engine.adapter_ids())} adapters), device={engine.device}, "
        f"dtype={engine.dtype}, torch threads={engine.threads}, "
        f"step budget={settings.max_step_tokens} tokens, "
        f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}\n"
        f"{args.requests} requests per system and level, at most {args.max_tokens} tokens, "
        f"greedy, top_k={args.top_k}, {len(mixes)} distinct adapter mixes among the prompts; "
        + ", ".join(f"{w}: first prompt {n} tokens" for w, (_, n) in counts.items())
    )
    print_table(results)
    print_targets(results)
    print()
    print_agreement(results, max(c for c, _ in counts.values()))
    plot(results, args.out, f"dynamerge throughput ({args.zoo} zoo, {engine.device})")
    print(f"\nplot: {args.out}")


def measure(
    args: argparse.Namespace, workload: str, clients: dict[str, Callable[[Prompt], Timing]],
    prompts: list[Prompt],
) -> list[LevelResult]:
    """Warm every system up, then run level by level (systems side by side in time)."""
    systems = [s for s in SYSTEMS if s in clients and s in args.systems]
    for system in systems:
        run_level(workload, system + "*", clients[system], prompts, 2, 2)  # warm-up, discarded
    results = []
    for level in args.levels:
        for system in systems:
            results.append(run_level(workload, system, clients[system], prompts, level,
                                     args.requests))
    return results


if __name__ == "__main__":
    main()
