"""The quality benchmark's measurements: exact match per row and task, routing, targets.

Everything goes through the engine's real path (`Engine.submit` / `Engine.route`). Requests are
submitted in a sliding window a few batches deep, so the engine's continuous batching keeps
`max_batch_size` sequences decoding together while results are collected in order.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from adapters.zoo.evaluate import load_eval_set
from adapters.zoo.tasks import answers_match
from app.engine.engine import Engine
from app.engine.types import GenerationRequest
from bench.quality_rows import Row, request_for, request_key
from router_index.router import RoutingOptions

# Tokens allowed beyond the longest reference answer, as adapters.zoo.evaluate allows.
EXTRA_NEW_TOKENS = 4
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class EvalSet:
    task: str  # the task, which is also its expert's adapter id
    prompts: list[str]
    answers: list[str]


@dataclass(frozen=True)
class Answer:
    text: str
    blend: tuple[tuple[str, float], ...]  # what the engine blended
    fallback: bool  # routing fell back (dynamic rows only)
    method: str  # merge method the engine reports


@dataclass
class QualityTable:
    tasks: list[str]
    rows: list[Row]
    accuracy: dict[str, dict[str, float]]  # row key -> task -> exact match in [0, 1]; nan: n/a
    n_examples: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)  # row key -> why it is n/a or caveats
    seconds: dict[str, float] = field(default_factory=dict)  # row key -> wall time of the row

    def average(self, key: str) -> float:
        values = [self.accuracy[key][t] for t in self.tasks]
        return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class RoutingReport:
    tasks: list[str]
    confusion: dict[str, dict[str, int]]  # true task -> top-1 task (or "fallback") -> count
    top1_accuracy: float  # routed, and to the true task first
    per_task_top1: dict[str, float]
    mean_true_weight: float  # alpha_hat of the true task over all K = N (0 on fallback)
    per_task_true_weight: dict[str, float]
    fallback_rate: float  # in-domain prompts that fell back (false fallbacks)
    options: RoutingOptions


@dataclass(frozen=True)
class Target:
    name: str
    met: bool
    detail: str


def load_eval_sets(store: Path, tasks: Sequence[str], limit: int | None,
                   eval_set: str = "eval") -> dict[str, EvalSet]:
    """Each task's held-out set (first `limit` prompts), via the zoo's own reader: `eval`
    (generated) or `paraphrases` (written by hand)."""
    sets = {}
    for task in tasks:
        pairs = load_eval_set(task, store, eval_set)[:limit]
        sets[task] = EvalSet(task, [p for p, _ in pairs], [a for _, a in pairs])
    return sets


def token_budget(engine: Engine, answers: Sequence[str], cap: int | None) -> int:
    """Longest reference answer (with its end-of-turn) plus a little, or `cap` when given."""
    if cap is not None:
        return cap
    tokenizer = engine.tokenizer
    longest = max(
        (len(tokenizer(a + END_OF_TURN, add_special_tokens=False)["input_ids"]) for a in answers),
        default=1,
    )
    return longest + EXTRA_NEW_TOKENS


def generate(
    engine: Engine, requests: Sequence[GenerationRequest], desc: str, window: int | None = None,
    progress: bool = True,
) -> list[Answer]:
    """Answers to `requests`, in order; identical requests are generated once.

    Args:
        engine: a loaded engine.
        requests: greedy requests.
        desc: progress bar label.
        window: requests in flight at once; 4 batches (within the engine's queue) when None.
        progress: show a tqdm bar.
    """
    s = engine.settings
    window = window or min(4 * s.max_batch_size, s.max_queue)
    unique: dict[tuple, int] = {}
    order = [unique.setdefault(request_key(r), len(unique)) for r in requests]
    todo = list({i: r for r, i in zip(requests, order, strict=True)}.values())
    done: list[Answer | None] = [None] * len(todo)
    in_flight: deque = deque()
    with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for i, request in enumerate(todo):
            if len(in_flight) >= window:
                _collect(in_flight, done, bar)
            in_flight.append((i, engine.submit(request)))
        while in_flight:
            _collect(in_flight, done, bar)
    return [done[i] for i in order]  # type: ignore[misc]


def _collect(in_flight: deque, done: list[Answer | None], bar: tqdm) -> None:
    i, stream = in_flight.popleft()
    text, final = stream.result()
    if final.finish_reason == "error":
        raise RuntimeError(f"the engine failed request {stream.request_id}")
    admission = stream.admission
    decision = admission.decision
    done[i] = Answer(
        text, tuple(admission.blend), bool(decision is not None and decision.fallback),
        getattr(admission, "method", "linear"),
    )
    bar.update(1)


def evaluate_rows(
    engine: Engine,
    rows: Sequence[Row],
    eval_sets: dict[str, EvalSet],
    defaults: RoutingOptions,
    max_tokens: dict[str, int],
    progress: bool = True,
) -> QualityTable:
    """Exact-match accuracy of every row on every task.

    A row the engine cannot run (an unsupported merge method, a mix it ignores) is reported
    as n/a with the reason, and the other rows still run.
    """
    tasks = list(eval_sets)
    table = QualityTable(tasks, list(rows), {}, {t: len(s.prompts) for t, s in eval_sets.items()})
    rendered = {
        t: [engine.render_chat([{"role": "user", "content": p}]) for p in s.prompts]
        for t, s in eval_sets.items()
    }
    for row in tqdm(rows, desc="rows", unit="row", disable=not progress):
        requests = [
            request_for(row, t, p, r, defaults, max_tokens[t])
            for t in tasks for p, r in zip(eval_sets[t].prompts, rendered[t], strict=True)
        ]
        started = time.perf_counter()
        try:
            answers = generate(engine, requests, row.label, progress=progress)
            _check_blend(row, answers, engine.settings.blend_weight_step)
        except Exception as exc:  # one row's failure must not lose the others
            table.accuracy[row.key] = dict.fromkeys(tasks, math.nan)
            table.notes[row.key] = f"n/a: {type(exc).__name__}: {exc}"
            continue
        table.seconds[row.key] = time.perf_counter() - started
        it = iter(answers)
        table.accuracy[row.key] = {
            t: _share(answers_match(t, next(it).text, a) for a in eval_sets[t].answers)
            for t in tasks
        }
    return table


def _share(flags: object) -> float:
    values = list(flags)  # type: ignore[call-overload]
    return sum(values) / len(values) if values else math.nan


def _check_blend(row: Row, answers: Sequence[Answer], step: float = 0.0) -> None:
    """The engine must have blended what the row asked for, or the row measures nothing: the
    same adapters, each weight as the engine rounds it (to `step`, blend_weight_step)."""
    if row.mix is None:
        return
    wanted = sorted((a, round(w, 6)) for a, w in row.mix)
    for answer in answers:
        got = sorted((a, round(w, 6)) for a, w in answer.blend)
        if [a for a, _ in got] != [a for a, _ in wanted] or any(
                abs(g - w) > step / 2 + 1e-6 for (_, g), (_, w) in zip(got, wanted, strict=True)):
            raise RuntimeError(f"asked for the static mix {wanted}, the engine blended {got}")
        if answer.method != row.method:
            raise RuntimeError(f"asked for merge {row.method!r}, the engine used {answer.method!r}")


def analyse_routing(
    engine: Engine, eval_sets: dict[str, EvalSet], options: RoutingOptions, progress: bool = True
) -> RoutingReport:
    """Top-1 routing, confusion matrix and weight on the true task for every eval prompt."""
    tasks = list(eval_sets)
    ids = engine.adapter_ids()
    full = replace(options, top_k=len(ids), explain=0)  # every task's weight
    confusion = {t: dict.fromkeys([*ids, "fallback"], 0) for t in tasks}
    weights: dict[str, list[float]] = {t: [] for t in tasks}
    bar = tqdm(total=sum(len(s.prompts) for s in eval_sets.values()), desc="routing",
               unit="prompt", disable=not progress, leave=False)
    with bar:
        for t in tasks:
            for prompt in eval_sets[t].prompts:
                decision = engine.route(prompt, full)
                top = "fallback" if decision.fallback else decision.hits[0].adapter_id
                confusion[t][top] += 1
                weights[t].append(
                    next((h.weight for h in decision.hits if h.adapter_id == t), 0.0)
                )
                bar.update(1)
    total = sum(len(w) for w in weights.values())
    return RoutingReport(
        tasks=tasks,
        confusion=confusion,
        top1_accuracy=sum(confusion[t][t] for t in tasks) / total,
        per_task_top1={t: confusion[t][t] / len(weights[t]) for t in tasks},
        mean_true_weight=sum(sum(w) for w in weights.values()) / total,
        per_task_true_weight={t: sum(w) / len(w) for t, w in weights.items()},
        fallback_rate=sum(confusion[t]["fallback"] for t in tasks) / total,
        options=options,
    )


def check_targets(table: QualityTable, routing: RoutingReport | None) -> list[Target]:
    """The issue's three targets, on whatever rows were run."""
    targets = []
    experts = {t: f"ft:{t}" for t in table.tasks if f"ft:{t}" in table.accuracy}
    dynamic = [r for r in table.rows if r.group == "dynamic"]
    static = [r for r in table.rows if r.group == "static" and not _is_nan(table.average(r.key))]
    for row in dynamic:
        if len(experts) == len(table.tasks):
            ratios = {
                t: _ratio(table.accuracy[row.key][t], table.accuracy[experts[t]][t])
                for t in table.tasks
            }
            worst = min(ratios, key=lambda t: ratios[t])
            targets.append(Target(
                f"{row.label} >= 99% of each expert on its own task",
                all(r >= 0.99 for r in ratios.values()),
                f"worst: {worst} at {100 * ratios[worst]:.1f}% of FT-{worst}",
            ))
        if static:
            best = max(static, key=lambda r: table.average(r.key))
            gap = 100 * (table.average(row.key) - table.average(best.key))
            targets.append(Target(
                f"{row.label} beats the best static merge by >= 15 points (average)",
                gap >= 15.0, f"{gap:+.1f} points over {best.label}",
            ))
    if routing is not None:
        targets.append(Target(
            "routing top-1 >= 98% on held-out prompts", routing.top1_accuracy >= 0.98,
            f"{100 * routing.top1_accuracy:.1f}%",
        ))
    return targets


def _ratio(value: float, reference: float) -> float:
    if reference == 0:
        return 1.0 if value >= 0 else 0.0
    return value / reference


def _is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


@dataclass(frozen=True)
class RuleRow:
    rule: str  # "centroid", "nearest", "learned", or a label such as "centroid @0.25"
    per_set: dict[str, tuple[float, float]]  # set -> (routing accuracy, false fallbacks)
    ood_fallback_rate: float


def compare_fallback_rules(
    engine: Engine, rules: dict[str, RoutingOptions], sets: dict[str, dict[str, EvalSet]],
    ood_prompts: Sequence[str], progress: bool = True,
) -> list[RuleRow]:
    """Each fallback rule on prompts calibration never saw: routing accuracy (routed to the
    true task first) and false fallbacks per set, and the OOD fallback rate."""
    rows = []
    total = len(rules) * (sum(len(s.prompts) for es in sets.values() for s in es.values())
                          + len(ood_prompts))
    with tqdm(total=total, desc="fallback rules", unit="route", disable=not progress,
              leave=False) as bar:
        for name, options in rules.items():
            per_set = {}
            for set_name, eval_sets in sets.items():
                correct = fell = n = 0
                for task, eval_set in eval_sets.items():
                    for prompt in eval_set.prompts:
                        decision = engine.route(prompt, options)
                        fell += decision.fallback
                        correct += bool(decision.hits) and decision.hits[0].adapter_id == task
                        n += 1
                        bar.update(1)
                per_set[set_name] = (correct / n, fell / n)
            caught = 0
            for prompt in ood_prompts:
                caught += engine.route(prompt, options).fallback
                bar.update(1)
            rows.append(RuleRow(name, per_set, caught / max(len(ood_prompts), 1)))
    return rows


def paraphrase_targets(table: QualityTable, routing: RoutingReport | None,
                       ood_fallback_rate: float | None) -> list[Target]:
    """Issue #12's targets on the hand-written paraphrase sets."""
    targets = []
    experts = {t: f"ft:{t}" for t in table.tasks if f"ft:{t}" in table.accuracy}
    for key, bound in (("top1", 0.99), ("top3", 0.97)):
        if key in table.accuracy and len(experts) == len(table.tasks):
            ratios = {t: _ratio(table.accuracy[key][t], table.accuracy[experts[t]][t])
                      for t in table.tasks}
            worst = min(ratios, key=lambda t: ratios[t])
            targets.append(Target(
                f"dynamic {key} >= {100 * bound:.0f}% of each expert (paraphrases)",
                all(r >= bound for r in ratios.values()),
                f"worst: {worst} at {100 * ratios[worst]:.1f}% of FT-{worst}"))
    for task in experts:
        targets.append(Target(
            f"FT-{task} >= 85% on its own paraphrases",
            table.accuracy[experts[task]][task] >= 0.85,
            f"{100 * table.accuracy[experts[task]][task]:.1f}%"))
    if routing is not None:
        targets.append(Target("routing top-1 >= 97% on paraphrases",
                              routing.top1_accuracy >= 0.97,
                              f"{100 * routing.top1_accuracy:.1f}%"))
        targets.append(Target("false fallbacks <= 2% on paraphrases",
                              routing.fallback_rate <= 0.02,
                              f"{100 * routing.fallback_rate:.1f}%"))
    if ood_fallback_rate is not None:
        targets.append(Target(">= 90% of out-of-domain prompts fall back",
                              ood_fallback_rate >= 0.9, f"{100 * ood_fallback_rate:.1f}%"))
    return targets
