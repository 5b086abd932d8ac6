"""Rendering of the quality benchmark: Markdown tables, the grouped bar chart, docs/results.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.fingerprint import FINGERPRINT_LABEL
from bench.quality_lib import QualityTable, RoutingReport, RuleRow, Target
from bench.quality_ood import OodReport
from router_index.calibrate import Calibration, format_tables
from router_index.router import RoutingOptions

SET_TITLES = {
    "eval": "held-out `eval.jsonl` (made by the same generators as the training data)",
    "paraphrases": "hand-written `paraphrases.jsonl` (phrased freely; no generator made them)",
}


@dataclass(frozen=True)
class RunInfo:
    command: str
    date: str  # ISO date-time
    zoo: str
    limit: int | None
    device: str
    seconds: float
    routing: str  # the routing defaults the dynamic rows used, in words
    fingerprint: str = ""  # adapters.fingerprint.zoo_fingerprint of the measured store


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def quality_markdown(table: QualityTable) -> str:
    """Table 1's shape: one row per model, one column per task, then the average (percent)."""
    head = [f"{t} (n={table.n_examples[t]})" for t in table.tasks]
    lines = ["| Model | " + " | ".join(head) + " | AVG | TIME (s) |",
             "|---|" + "---:|" * (len(head) + 2)]
    for row in table.rows:
        cells = [pct(table.accuracy[row.key][t]) for t in table.tasks]
        label = f"**{row.label}**" if row.group == "dynamic" else row.label
        seconds = table.seconds.get(row.key)
        time_cell = "n/a" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {pct(table.average(row.key))} | {time_cell} |")
    notes = [f"- {_label(table, k)}: {v}" for k, v in table.notes.items()]
    return "\n".join(lines + (["", *notes] if notes else []))


def _label(table: QualityTable, key: str) -> str:
    return next(r.label for r in table.rows if r.key == key)


def rules_markdown(rules: Sequence[RuleRow], defaults: RoutingOptions) -> str:
    """The fallback rules side by side, on prompts calibration never saw."""
    sets = list(rules[0].per_set) if rules else []
    head = " | ".join(f"{s}: routed right | {s}: false fallbacks" for s in sets)
    lines = [
        "Each rule as calibration places it (at most 1% of the cross-fitted exemplars may fall "
        "back; then as many calibration OOD prompts as possible), measured on sets calibration "
        "never saw: "
        "the held-out sets below and `bench/data/ood_eval.jsonl`. The server uses "
        f"**{defaults.fallback}**.",
        "",
        f"| rule | {head} | OOD fallback |",
        "|---|" + "---:|" * (2 * len(sets) + 1),
    ]
    for r in rules:
        cells = " | ".join(f"{pct(r.per_set[s][0])}% | {pct(r.per_set[s][1])}%" for s in sets)
        lines.append(f"| {r.rule} | {cells} | {pct(r.ood_fallback_rate)}% |")
    return "\n".join(lines)


def routing_markdown(report: RoutingReport) -> str:
    """Routing accuracy, the confusion matrix (true task x top-1 task) and the true weight."""
    cols = [c for c in next(iter(report.confusion.values()))]
    o = report.options
    lines = [
        f"Routing on the same prompts (scoring {o.scoring}, {o.sharpening} "
        f"sharpening, τ={o.temperature:g}, fallback rule {o.fallback}): top-1 accuracy "
        f"**{100 * report.top1_accuracy:.1f}%**, mean weight on the true task "
        f"**{report.mean_true_weight:.4f}**, false fallbacks {100 * report.fallback_rate:.1f}%.",
        "",
        "| true task \\ top-1 | " + " | ".join(cols) + " | top-1 acc | weight on true |",
        "|---|" + "---:|" * (len(cols) + 2),
    ]
    for t in report.tasks:
        counts = " | ".join(str(report.confusion[t][c]) for c in cols)
        lines.append(f"| {t} | {counts} | {pct(report.per_task_top1[t])} "
                     f"| {report.per_task_true_weight[t]:.4f} |")
    return "\n".join(lines)


def targets_markdown(targets: Sequence[Target]) -> str:
    lines = ["| target | met | detail |", "|---|:---:|---|"]
    lines += [f"| {t.name} | {'yes' if t.met else '**no**'} | {t.detail} |" for t in targets]
    return "\n".join(lines)


def ood_markdown(ood: OodReport) -> str:
    same_f, n_f = ood.identical_on_fallback
    same_r, n_r = ood.identical_when_routed
    lines = [
        f"{ood.n_prompts} held-out general chat prompts (`bench/data/ood_eval.jsonl`, none of "
        f"them used by `dynamerge calibrate`), greedy answers of "
        f"up to {ood.max_tokens} tokens:",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| OOD prompts that fall back to the base model | {pct(ood.fallback_rate)}% |",
        f"| in-domain hand-written prompts that fall back (false fallbacks) | "
        f"{pct(ood.in_domain_fallback_rate)}% |",
        f"| fallbacks whose `auto` answer is identical to `base` | {same_f}/{n_f} |",
        f"| routed OOD prompts whose answer still equals `base` | {same_r}/{n_r} |",
    ]
    if ood.routed:
        lines += ["", "OOD prompts routed to an adapter instead of falling back:", ""]
        lines += [f"- {s:.3f} → {a}: {p}" for p, a, s in ood.routed]
    return "\n".join(lines)


def write_plot(tables: Sequence[tuple[str, QualityTable]], path: Path) -> None:
    """Grouped bars per set: one group per task (and the average), one bar per non-expert
    row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 4.2 * len(tables)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, table) in zip(axes[:, 0], tables, strict=True):
        rows = [r for r in table.rows if r.group != "expert"]
        groups = [*table.tasks, "AVG"]
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            values = [table.accuracy[row.key][t] for t in table.tasks] + [table.average(row.key)]
            xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [0 if math.isnan(v) else 100 * v for v in values], width,
                   label=row.label, color=cmap(i % 10))
        ax.set_xticks(range(len(groups)), groups, rotation=15)
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name}: base, static merges, dynamic routing-merging, oracle")
        ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(
    info: RunInfo,
    sections: Sequence[tuple[str, QualityTable, RoutingReport | None, Sequence[Target]]],
    rules: Sequence[RuleRow],
    defaults: RoutingOptions,
    ood: OodReport | None,
    calibration: Calibration | None,
    plot: Path | None,
    docs_dir: Path,
) -> str:
    """The whole of docs/results.md."""
    parts = [
        "# Results",
        "",
        f"Generated by `{info.command}` on {info.date} ({info.zoo} zoo, "
        f"{'all' if info.limit is None else info.limit} prompts per task and set, "
        f"{info.device}, {info.seconds / 60:.1f} min). Exact match uses the zoo's scorer "
        "(`adapters.zoo.tasks.answers_match`: stripped text; numbers compared by value; JSON "
        "parsed for json_extract); greedy decoding through the engine's real path "
        "(continuous batching)."
        + (f" Measured on {FINGERPRINT_LABEL} `{info.fingerprint}`." if info.fingerprint
           else ""),
        "",
        "FT-x: expert x alone. Static merges of all experts: weight averaging (linear, 1/N "
        "each), task arithmetic (linear, 0.3 each), TIES / DARE-TIES / NeuroMerging (weight 1 "
        "each, default parameters: density 0.2, drop rate 0.5, mask ratio 0.15; stored "
        f"exactly). Dynamic rows route each prompt with {info.routing}; weights are "
        "alpha_hat, not re-normalised (Eq. 9). Oracle: the true task's expert. TIME: wall "
        "time of the row here (identical requests within a row are generated once).",
    ]
    if plot is not None:
        parts += ["", f"![quality]({_relative(plot, docs_dir)})"]
    for name, table, routing, targets in sections:
        parts += ["", f"## Quality on the {SET_TITLES.get(name, name)}", "",
                  quality_markdown(table)]
        if targets:
            parts += ["", "### Targets", "", targets_markdown(targets)]
        if routing is not None:
            parts += ["", "### Routing", "", routing_markdown(routing)]
    if rules:
        parts += ["", "## Fallback rules compared", "", rules_markdown(rules, defaults)]
    if calibration is not None:
        parts += ["", "## Calibration", "", format_tables(calibration)]
    if ood is not None:
        parts += ["", "## Out-of-domain prompts", "", ood_markdown(ood)]
    return "\n".join(parts) + "\n"


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
