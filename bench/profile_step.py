"""Where a decode step goes: the scheduler's phases, and the forward by operator class.

    python bench/profile_step.py                       # demo zoo, 1 decode thread
    python bench/profile_step.py --threads 2 --steps 30 --profile-steps 10

Loads the demo engine in-process and, for base and for top-3 blends (three demo adapters
with weights, given explicitly: no routing) at batch 1 and batch 8 (every row a different
blend), runs steady decode (every row running, nothing prefilling) and reports per step:

1. the scheduler's phases, from its `dynamerge_decode_phase_seconds` timers: building the
   blend batch, the inputs and mask, the model forward (with the LM head, timed apart by
   hooks), argmax/sampling, `_advance` (stop checks, detokenising, stream events) and
   bookkeeping; "loop" is the rest of the step (cancel checks, the job queue, metrics);
2. a `torch.profiler` table of the forward (CPU, record_shapes off), every op attributed to
   the innermost module it ran in (record_function ranges pushed by module hooks): base
   linears, LM head, LoRA terms, attention kernel, the rest of attention (rotary, KV cache
   writes, reshapes), RMSNorm, MLP activation, the rest; "Python and dispatch" is the
   unprofiled forward's wall time minus the ops' self time. The profiled steps' extra wall
   time is reported as the profiler's own cost.

Then torch's GEMV bandwidth on the tied LM head ([49152, 576] fp32, 113 MB, far beyond any
cache) at 1 and 2 threads, and the bandwidth floor of a batch-1 step that it implies (every
weight read once per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # as `dynamerge serve` sets it (app/cli.py)

import torch
from prometheus_client import REGISTRY
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from app.engine.blend import AUTO_MODEL, BASE_MODEL
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from app.settings import Settings

PHASES = ("blend", "inputs", "forward", "sample", "advance", "bookkeeping")
PROMPTS = [
    "What is 47 plus 38?", "Spell 'garden' letter by letter.",
    "Reverse the word order: blue sky over hills", "Convert 5 kilometres to metres.",
    "Is this review positive or negative? The food was cold.",
    "Extract the name as JSON: Alice is 30.", "What is 12 times 9?",
    "Spell 'river' letter by letter.",
]
ADAPTERS = ("arithmetic", "spell", "reverse_words", "unit_convert", "sentiment",
            "json_extract")
WEIGHTS = (0.5, 0.3, 0.2)
CLASSES = ("base linears", "LM head", "LoRA terms", "attention kernel", "attention other",
           "RMSNorm", "MLP activation", "other ops")


@dataclass
class Case:
    name: str
    batch: int
    blended: bool


def blend_of(row: int) -> tuple[tuple[str, float], ...]:
    """Row `row`'s top-3 blend: three of the six demo adapters, rotating, weights 0.5/0.3/0.2."""
    return tuple((ADAPTERS[(row + k) % len(ADAPTERS)], w) for k, w in enumerate(WEIGHTS))


class Probe:
    """Wraps the scheduler's `_decode` (on the engine's worker thread): counts steady steps,
    times whole steps and the LM head, and profiles a run of steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler
        assert self.scheduler is not None
        self.original = self.scheduler._decode
        self.scheduler._decode = self._decode  # type: ignore[method-assign]
        self.head = engine.model.get_output_embeddings()
        self.head.register_forward_pre_hook(self._head_in)
        self.head.register_forward_hook(self._head_out)
        self.batch = 0
        self.want = 0  # steady steps to record
        self.profile_steps = 0
        self.starts: list[float] = []
        self.head_s: list[float] = []
        self.prof: profile | None = None
        self.done = threading.Event()
        self._head_started = 0.0
        self._hooks: list = []

    def arm(self, batch: int, steps: int, profile_steps: int) -> None:
        self.batch, self.want, self.profile_steps = batch, steps, profile_steps
        self.starts, self.head_s, self.prof = [], [], None
        self.phase0 = phase_sums()
        self.done.clear()

    def _steady(self) -> bool:
        s = self.scheduler
        return len(s.running) == self.batch and not s.prefilling and not s.waiting

    def _decode(self) -> None:
        if self.want and self._steady() and not self.done.is_set():
            now = time.perf_counter()
            if len(self.starts) == self.want:  # the timed steps are over: profile the next
                self.phase1 = phase_sums()
                self.starts.append(now)
                self._start_profile()
            elif len(self.starts) < self.want:
                if not self.starts:
                    self.phase0 = phase_sums()
                self.starts.append(now)
            else:
                self.starts.append(now)
                if len(self.starts) == self.want + 1 + self.profile_steps:
                    self._stop_profile()
                    self.done.set()
        self.original()

    def _start_profile(self) -> None:
        self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self.prof.__enter__()
        for module in self.engine.model.modules():
            self._hooks.append(module.register_forward_pre_hook(_enter_range))
            self._hooks.append(module.register_forward_hook(_exit_range))

    def _stop_profile(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        assert self.prof is not None
        self.prof.__exit__(None, None, None)

    def _head_in(self, module: nn.Module, args: tuple) -> None:
        self._head_started = time.perf_counter()

    def _head_out(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.want and len(self.starts) and len(self.starts) <= self.want:
            self.head_s.append(time.perf_counter() - self._head_started)


_ranges: list = []


def _enter_range(module: nn.Module, args: tuple) -> None:
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        name = "Linear"
    rf = record_function(f"mod::{name}::{id(module)}")
    rf.__enter__()
    _ranges.append(rf)


def _exit_range(module: nn.Module, args: tuple, out: object) -> None:
    _ranges.pop().__exit__(None, None, None)


def phase_sums() -> dict[str, float]:
    return {p: REGISTRY.get_sample_value("dynamerge_decode_phase_seconds_sum",
                                         {"phase": p}) or 0.0 for p in PHASES}


def classify(prof: profile, head_id: int) -> tuple[dict[str, float], dict[str, float]]:
    """Self CPU µs of the profiled ops by class (innermost module) and by op name."""
    by_class: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("mod::") or event.name.startswith("ProfilerStep"):
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if not any(c.startswith("mod::") for c in chain):
            continue  # outside the model forward (the scheduler's own ops)
        by_op[event.name] += event.self_cpu_time_total
        by_class[_op_class(event.name, chain, head_id)] += event.self_cpu_time_total
    return by_class, by_op


def _op_class(name: str, chain: list[str], head_id: int) -> str:
    if "scaled_dot_product" in name or any("scaled_dot_product" in c for c in chain):
        return "attention kernel"
    mods = [c.split("::") for c in chain if c.startswith("mod::")]
    inner = mods[0][1]
    outer = mods[1] if len(mods) > 1 else None
    if inner == "Linear":
        return "LM head" if outer and outer[2] == str(head_id) else "base linears"
    if inner == "BlendedLoRALinear":
        return "LoRA terms"
    if inner.endswith("RMSNorm"):
        return "RMSNorm"
    if inner.endswith("Attention"):
        return "attention other"
    if inner.endswith("MLP") or "Activation" in inner or inner in ("SiLU", "SiLUActivation"):
        return "MLP activation"
    return "other ops"


def run_case(engine: Engine, probe: Probe, case: Case, steps: int, profile_steps: int
             ) -> dict:
    extra = 10
    sampling = SamplingParams(max_tokens=steps + profile_steps + 2 * extra, temperature=0.0,
                              ignore_eos=True)
    probe.arm(case.batch, steps, profile_steps)

    def client(row: int) -> None:
        text = PROMPTS[row % len(PROMPTS)]
        prompt = engine.render_chat([{"role": "user", "content": text}])
        request = GenerationRequest(
            prompt=prompt, route_text=text, model=AUTO_MODEL if case.blended else BASE_MODEL,
            mix=blend_of(row) if case.blended else None, sampling=sampling)
        for _ in engine.submit(request):
            pass

    threads = [threading.Thread(target=client, args=(b,)) for b in range(case.batch)]
    for t in threads:
        t.start()
    if not probe.done.wait(600):
        raise SystemExit(f"{case.name}: no steady decode (batch {case.batch})")
    for t in threads:
        t.join()
    periods = [b - a for a, b in zip(probe.starts, probe.starts[1:], strict=False)]
    timed, profiled = periods[:steps], periods[steps:]  # decodes 0..steps-1, then profiled
    step_ms = 1000 * statistics.mean(timed)
    phases = {p: 1000 * (probe.phase1[p] - probe.phase0[p]) / steps for p in PHASES}
    head_ms = 1000 * statistics.mean(probe.head_s)
    assert probe.prof is not None
    by_class, by_op = classify(probe.prof, id(probe.head))
    n = len(profiled)
    return {
        "case": case, "step_ms": step_ms, "phases": phases, "head_ms": head_ms,
        "profiled_ms": 1000 * statistics.mean(profiled),
        "classes": {k: v / 1000 / n for k, v in by_class.items()},
        "ops": {k: v / 1000 / n for k, v in by_op.items()},
    }


def gemv_bandwidth(weight: torch.Tensor, threads: int, reps: int = 40) -> float:
    """GB/s of `x @ W.T` for one row x, on `threads` torch threads of this thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(1, weight.shape[1])
    try:
        for _ in range(5):
            torch.nn.functional.linear(x, weight)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return weight.numel() * weight.element_size() / statistics.median(times) / 1e9


def print_report(results: list[dict], bandwidth: dict[int, float], step_bytes: int) -> None:
    names = [r["case"].name for r in results]
    print("\nper decode step, ms (share of the step)")
    print("| phase | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    rows: list[tuple[str, list[float]]] = []
    for p in PHASES:
        if p == "forward":
            rows.append(("forward without LM head",
                         [r["phases"][p] - r["head_ms"] for r in results]))
            rows.append(("LM head", [r["head_ms"] for r in results]))
        else:
            rows.append((p, [r["phases"][p] for r in results]))
    rows.append(("loop (rest of the step)",
                 [r["step_ms"] - sum(r["phases"].values()) for r in results]))
    rows.append(("whole step", [r["step_ms"] for r in results]))
    for label, values in rows:
        cells = [f"{v:.2f} ({100 * v / r['step_ms']:.0f}%)" for v, r in zip(values, results,
                                                                            strict=True)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nthe forward by op class, ms per step (share of the unprofiled forward)")
    print("| op class | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    for label in CLASSES:
        cells = [f"{r['classes'].get(label, 0.0):.2f} "
                 f"({100 * r['classes'].get(label, 0.0) / r['phases']['forward']:.0f}%)"
                 for r in results]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for r in results:
        python = r["phases"]["forward"] - sum(r["classes"].values())
        cells.append(f"{python:.2f} ({100 * python / r['phases']['forward']:.0f}%)")
    print("| Python and dispatch (forward - op self time) | " + " | ".join(cells) + " |")
    print("| profiler's own cost (profiled step - step) | " + " | ".join(
        f"+{r['profiled_ms'] - r['step_ms']:.1f} ms" for r in results) + " |")
    print("\ntop ops by self time, ms per step")
    for r in results:
        top = sorted(r["ops"].items(), key=lambda kv: -kv[1])[:8]
        print(f"  {r['case'].name}: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    print("\nGEMV on the LM head [49152, 576] fp32: " + ", ".join(
        f"{t} thread{'s' if t > 1 else ''} {bw:.1f} GB/s" for t, bw in bandwidth.items()))
    print(f"bandwidth floor of a batch-1 step ({step_bytes / 1e6:.0f} MB of weights): " + ", ".join(
        f"{t} thread{'s' if t > 1 else ''} {step_bytes / bw / 1e6:.1f} ms"
        for t, bw in bandwidth.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the decode")
    parser.add_argument("--steps", type=int, default=40, help="timed steady steps per case")
    parser.add_argument("--profile-steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(f"uptime at start: {os.getloadavg()}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    settings = Settings(torch_threads=args.threads, decode_threads=args.threads)
    engine = Engine(settings)
    engine.load(show_progress=False)
    probe = Probe(engine)
    cases = [Case(f"{kind} b{b}", b, kind == "blend") for b in args.batches
             for kind in ("base", "blend")]
    results = []
    for case in cases:
        print(f"{case.name}: load {os.getloadavg()[0]:.2f}", flush=True)
        results.append(run_case(engine, probe, case, args.steps, args.profile_steps))
    head = engine.model.get_output_embeddings().weight
    bandwidth = {t: gemv_bandwidth(head, t) for t in (1, 2)}
    # Every weight read once per step; parameters() counts the tied embedding/head once (an
    # untied embedding would be counted though only its rows are read: none here).
    step_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    print_report(results, bandwidth, step_bytes)
    print(f"uptime at end: {os.getloadavg()}")
    engine.shutdown()


if __name__ == "__main__":
    main()
