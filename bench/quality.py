"""Quality benchmark: TR-Merging's Table 1 on the zoo, routing accuracy, targets, OOD fallback.

    python -m bench.quality                      # demo zoo, every row, writes docs/
    python -m bench.quality --zoo micro --limit 4 --rows base,ft,avg,top1,oracle --no-docs
    python -m bench.quality --calibration calibration.json   # routing as calibrated

Rows (`--rows`, comma-separated): base, ft (every expert alone; ft:<id> for one), avg (weight
averaging), ta (task arithmetic, λ=0.3), ties, dare_ties, neuro, top<K> (dynamic routing-merging
at the engine's default temperature; top<K>@<tau> for another), oracle. See bench/quality_rows.py
for the static merges' weights and parameters.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from adapters.fingerprint import FINGERPRINT_LABEL, zoo_fingerprint
from adapters.zoo.evaluate import EVAL_SETS as _SET_FILES
from app.engine.calibration import fallback_rule_options
from app.engine.engine import Engine
from app.settings import Settings
from bench.quality_lib import (
    QualityTable,
    RoutingReport,
    RuleRow,
    Target,
    analyse_routing,
    check_targets,
    compare_fallback_rules,
    evaluate_rows,
    load_eval_sets,
    paraphrase_targets,
    token_budget,
)
from bench.quality_ood import OOD_EVAL_PROMPTS, OodReport, ood_check
from bench.quality_report import (
    RunInfo,
    ood_markdown,
    quality_markdown,
    results_markdown,
    routing_markdown,
    rules_markdown,
    targets_markdown,
    write_plot,
)
from bench.quality_rows import DEFAULT_ROWS, expand_rows
from router_index.calibrate import Calibration, load_calibration, read_prompts

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Section:
    """One held-out set's measurements."""

    name: str  # "eval" (generated) or "paraphrases" (written by hand)
    table: QualityTable
    routing: RoutingReport | None
    targets: list[Target]


@dataclass(frozen=True)
class QualityResult:
    sections: list[Section]
    ood: OodReport | None
    rules: list[RuleRow]  # the fallback rules compared on unseen prompts
    markdown: str  # what docs/results.md receives

    @property
    def table(self) -> QualityTable:  # the generated eval set's, as before paraphrases
        return self.sections[0].table

    @property
    def routing(self) -> RoutingReport | None:
        return self.sections[0].routing

    @property
    def targets(self) -> list[Target]:
        return [t for section in self.sections for t in section.targets]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=["demo", "micro"], default="demo")
    parser.add_argument("--limit", type=int, default=None, help="eval prompts per task")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration JSON whose routing values the dynamic rows use")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="generation budget (default: longest answer of the task + 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="engine max_batch_size")
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's torch threads (default: DYNAMERGE_TORCH_THREADS or "
                             "half the cores)")
    parser.add_argument("--sets", default="eval,paraphrases",
                        help="held-out sets: eval (generated), paraphrases (hand-written)")
    parser.add_argument("--no-rules", action="store_true",
                        help="skip the fallback-rule comparison")
    parser.add_argument("--no-routing", action="store_true", help="skip the routing analysis")
    parser.add_argument("--no-ood", action="store_true", help="skip the out-of-domain check")
    parser.add_argument("--ood-max-tokens", type=int, default=48)
    parser.add_argument("--ood-limit", type=int, default=None, help="OOD prompts used")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "quality.png")
    parser.add_argument("--no-docs", action="store_true", help="print only; write nothing")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def build_engine(zoo: str, batch_size: int, workdir: Path, threads: int | None = None,
                 **settings: object) -> Engine:
    """A loaded engine on the demo zoo (settings from DYNAMERGE_*) or a fresh micro zoo.

    `settings` override further Settings fields (other benchmarks use this engine too).
    """
    overrides: dict = {"max_batch_size": batch_size, "max_queue": 100_000, **settings}
    if threads is not None:
        overrides["torch_threads"] = threads
    if zoo == "micro":
        from adapters.zoo.micro import build_micro_zoo

        micro = build_micro_zoo(workdir / "micro_zoo")
        settings = Settings(base_model=micro.base_dir, adapter_store=micro.store_dir,
                            cache_dir=workdir / "cache", **overrides)
    else:
        settings = Settings(**overrides)
    engine = Engine(settings)
    engine.load(show_progress=False)
    return engine


def run(args: argparse.Namespace, engine: Engine, command: str) -> QualityResult:
    """Every measurement on a loaded engine, printed, and written to docs unless --no-docs."""
    started = time.perf_counter()
    progress = not args.no_progress
    store = Path(engine.settings.adapter_store)
    tasks = [a for a in engine.adapter_ids() if (store / a / "eval.jsonl").is_file()]
    if not tasks:
        raise SystemExit(f"no adapter in {store} has an eval.jsonl")
    rows = expand_rows([k.strip() for k in args.rows.split(",") if k.strip()], tasks)
    calibration: Calibration | None = None
    defaults = engine.router.defaults
    if args.calibration is not None:
        calibration = load_calibration(args.calibration)
        defaults = calibration.apply(defaults)
    wanted = [name.strip() for name in args.sets.split(",") if name.strip()]
    names = [n for n in wanted if all((store / t / _SET_FILES[n]).is_file() for t in tasks)]
    sets = {n: load_eval_sets(store, tasks, args.limit, n) for n in names}
    ood = None
    if not args.no_ood:
        ood = ood_check(engine, defaults, float("nan"), read_prompts(OOD_EVAL_PROMPTS)[
            : args.ood_limit], args.ood_max_tokens, progress)
    sections = []
    for name, eval_sets in sets.items():
        budgets = {t: token_budget(engine, s.answers, args.max_tokens)
                   for t, s in eval_sets.items()}
        table = evaluate_rows(engine, rows, eval_sets, defaults, budgets, progress)
        routing = None if args.no_routing else analyse_routing(engine, eval_sets, defaults,
                                                               progress)
        targets = check_targets(table, routing) if name == "eval" else paraphrase_targets(
            table, routing, ood.fallback_rate if ood is not None else None)
        sections.append(Section(name, table, routing, targets))
    if ood is not None and sections and sections[0].routing is not None:
        ood = replace(ood, in_domain_fallback_rate=sections[-1].routing.fallback_rate)
    rules: list[RuleRow] = []
    if not args.no_rules and len(engine.router.index.task_ids) > 1:
        options = {"centroid @0.25 (the old default)": replace(
            defaults, fallback="centroid", threshold=0.25, fallback_weights=None)}
        options.update(fallback_rule_options(engine.router, engine.settings))
        rules = compare_fallback_rules(engine, options, sets, read_prompts(
            OOD_EVAL_PROMPTS)[: args.ood_limit], progress)

    for section in sections:
        print(f"\n### {section.name}\n\n" + quality_markdown(section.table))
        if section.routing is not None:
            print("\n" + routing_markdown(section.routing))
        if section.targets:
            print("\n" + targets_markdown(section.targets))
    if rules:
        print("\n" + rules_markdown(rules, defaults))
    if ood is not None:
        print("\n" + ood_markdown(ood))

    info = RunInfo(
        command=command,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        zoo=args.zoo,
        limit=args.limit,
        device=f"{engine.device} {str(engine.dtype).removeprefix('torch.')}, batch "
        f"{engine.settings.max_batch_size}",
        seconds=time.perf_counter() - started,
        routing=f"{defaults.scoring} scoring, {defaults.sharpening} sharpening, "
        f"τ={defaults.temperature:g}, fallback rule {defaults.fallback}"
        + (f" (threshold {defaults.threshold:g})" if defaults.fallback != "learned" else "")
        + (f", from {args.calibration.name}" if calibration is not None else
           ", the engine's defaults (calibrated for this store)"),
        fingerprint=zoo_fingerprint(store),
    )
    print(f"\n{FINGERPRINT_LABEL}: {info.fingerprint}")
    calibration = calibration or engine.calibration
    plot = None if args.no_docs else args.plot
    markdown = results_markdown(info, [(s.name, s.table, s.routing, s.targets)
                                       for s in sections], rules, defaults, ood, calibration,
                                plot, args.results.parent)
    if not args.no_docs:
        write_plot([(s.name, s.table) for s in sections], args.plot)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(markdown, encoding="utf-8")
        print(f"\nwrote {args.results} and {args.plot}")
    return QualityResult(sections, ood, rules, markdown)


def main(argv: Sequence[str] | None = None, engine: Engine | None = None) -> QualityResult:
    """Run the benchmark.

    Args:
        argv: command-line arguments (sys.argv[1:] when None).
        engine: a loaded engine to measure (tests pass theirs); built from --zoo when None.

    Returns:
        Everything measured, and the Markdown written to docs/results.md.
    """
    args = parse_args(argv)
    command = "python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    if engine is not None:
        return run(args, engine, command.strip())
    with tempfile.TemporaryDirectory(prefix="dynamerge-quality-") as workdir:
        own = build_engine(args.zoo, args.batch_size, Path(workdir), args.threads)
        try:
            return run(args, own, command.strip())
        finally:
            own.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
