"""Exact-match accuracy of the demo base model and of every demo expert on every task.

Rows are the base model (adapters disabled) and each expert alone; columns are the tasks'
held-out sets: `eval.jsonl` (drawn from the generators, like the training data) or
`paraphrases.jsonl` (written by hand, phrased freely: what users send). Generation is greedy
and batched with left padding, through PEFT with every adapter loaded once (`set_adapter` /
`disable_adapter()`), so the numbers describe the committed bf16 adapter files exactly as a
PEFT user would load them. `--breakdown` adds each expert's accuracy on its own task per
sub-category (`categorize`: operation and digits, unit family and direction, ...).

    python -m adapters.zoo.evaluate --cache-dir ~/.cache/dynamerge --set paraphrases --breakdown
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.zoo.base import ensure_demo_base
from adapters.zoo.tasks import (
    PARAPHRASES_FILE,
    TASKS,
    UNIT_PAIRS,
    UNIT_WORDS,
    answers_match,
    parse_number,
)
from adapters.zoo.train import DEMO_DIR, END_OF_TURN, encode_prompt

__all__ = [
    "BASE_ROW",
    "EVAL_SETS",
    "EvalTable",
    "breakdown",
    "categorize",
    "evaluate",
    "format_breakdown",
    "format_table",
    "load_eval_set",
    "main",
]

logger = logging.getLogger(__name__)

BASE_ROW = "base"
# Tokens allowed beyond the longest reference answer: enough to see an answer end, few enough
# that a chatty model does not spend the evaluation writing paragraphs.
_EXTRA_NEW_TOKENS = 4
# Which file of a task folder each named set is.
EVAL_SETS = {"eval": "eval.jsonl", "paraphrases": PARAPHRASES_FILE}


@dataclass(frozen=True, slots=True)
class EvalTable:
    """Accuracy of each model (row) on each task (column)."""

    rows: list[str]  # "base", then one expert per adapter
    tasks: list[str]
    accuracy: dict[str, dict[str, float]]  # row -> task -> fraction correct in [0, 1]
    n_examples: dict[str, int]  # task -> eval examples scored
    predictions: dict[str, dict[str, list[str]]]  # row -> task -> generated texts, in order
    seconds: float
    eval_set: str = "eval"  # a key of EVAL_SETS
    pairs: dict[str, list[tuple[str, str]]] | None = None  # task -> (prompt, answer) scored
    # A row without a task's cell (own_task_only) has no key for it in accuracy/predictions.


def load_eval_set(
    task: str, demo_dir: Path = DEMO_DIR, eval_set: str = "eval"
) -> list[tuple[str, str]]:
    """Read a task's `eval.jsonl` (or another of `EVAL_SETS`).

    Args:
        task: the task folder name.
        demo_dir: the zoo folder.
        eval_set: "eval" (generated, held out) or "paraphrases" (written by hand).

    Returns:
        (prompt, answer) pairs in file order.
    """
    path = Path(demo_dir) / task / EVAL_SETS[eval_set]
    with path.open(encoding="utf-8") as f:
        return [(r["prompt"], r["answer"]) for r in map(json.loads, f) if r]


# --------------------------------------------------------------------------------------------
# sub-categories, read back from the prompt so that hand-written sets get them too

_FAMILY = {u: family for family, large, small, _ in UNIT_PAIRS for u in (large, small)}
_MUL_WORDS = re.compile(r"times|product|multipl|\beach\b|\brows of\b|\d\s*[x*]\s*\d")
_SUB_WORDS = re.compile(
    r"minus|take|away|subtract|\bless\b|difference|deduct|\bleft\b|remain|\blost\b|"
    r"\d\s*-\s*\d"
)


def categorize(task: str, prompt: str, answer: str) -> str:
    """A sub-category of one example, for breakdowns of accuracy.

    arithmetic: operation and digits of the larger operand ("sub 3-digit", "mul 2-digit");
    unit_convert: family and direction ("time down": to a larger unit); sentiment: the label;
    reverse_words: the number of words; spell: the word's length; json_extract: whether the
    name has several words. A heuristic on the text: good for reports, not for scoring.
    """
    text = prompt.lower()
    if task == "arithmetic":
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        op = "mul" if _MUL_WORDS.search(text) else "sub" if _SUB_WORDS.search(text) else "add"
        return f"{op} {len(str(max(numbers, default=0)))}-digit"
    if task == "unit_convert":
        value = re.search(r"\d+(?:\.\d+)?", text)
        units = [UNIT_WORDS[w] for w in re.findall(r"[a-z]+", text) if w in UNIT_WORDS]
        family = _FAMILY.get(units[0], "?") if units else "?"
        got = parse_number(answer)
        if value is None or got is None:
            return family
        return f"{family} {'up' if got > parse_number(value.group()) else 'down'}"
    if task == "sentiment":
        return answer
    if task == "reverse_words":
        return f"{len(answer.split())} words"
    if task == "spell":
        n = answer.count("-") + 1
        return "3-5 letters" if n <= 5 else "6-8 letters" if n <= 8 else "9+ letters"
    if task == "json_extract":
        try:
            name = json.loads(answer)["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return "?"
        return "full name" if " " in str(name) else "name"
    return "all"


# --------------------------------------------------------------------------------------------
# worker side: one PeftModel holding every adapter, per process

_model = None
_tokenizer = None


def _init_worker(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    global _model, _tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # one process per core beats threads on small matrices
    _tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    _model = model.eval()


@torch.no_grad()
def _generate(row: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    assert _model is not None and _tokenizer is not None
    batch = _tokenizer.pad(
        {"input_ids": [encode_prompt(_tokenizer, p) for p in prompts]}, return_tensors="pt"
    )
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": _tokenizer.pad_token_id,
        "eos_token_id": _tokenizer.eos_token_id,
    }
    if row == BASE_ROW:
        with _model.disable_adapter():
            out = _model.generate(**kwargs)
    else:
        _model.set_adapter(row)
        out = _model.generate(**kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return _tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _run_job(
    row: str, task: str, start: int, prompts: list[str], max_new_tokens: int
) -> tuple[str, str, int, list[str]]:
    return row, task, start, _generate(row, prompts, max_new_tokens)


# --------------------------------------------------------------------------------------------


def evaluate(
    cache_dir: Path,
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    experts: Sequence[str] | None = None,
    demo_dir: Path = DEMO_DIR,
    batch_size: int = 32,
    workers: int = 2,
    eval_set: str = "eval",
    own_task_only: bool = False,
    base: bool = True,
) -> EvalTable:
    """Score the base model and every expert on every task's eval set.

    Args:
        cache_dir: cache folder of the converted base model (`Settings.cache_dir`).
        limit: score only the first `limit` examples of each eval set (all when None).
        tasks: the columns; every task with a folder in `demo_dir` when None.
        experts: the adapter rows; the same folders when None.
        demo_dir: the zoo folder (`<task>/adapter_*`, `<task>/eval.jsonl`).
        batch_size: prompts per generate call.
        workers: worker processes, one thread each.
        eval_set: which file of each task folder: "eval" or "paraphrases" (`EVAL_SETS`).
        own_task_only: score each expert on its own task only (the base on every task).
        base: include the base model's row.

    Returns:
        The accuracy table with every prediction.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    demo_dir = Path(demo_dir)
    filename = EVAL_SETS[eval_set]
    present = [t for t in TASKS if (demo_dir / t / filename).is_file()]
    tasks = list(tasks) if tasks else present
    experts = list(experts) if experts is not None else [
        t for t in TASKS if (demo_dir / t / "adapter_config.json").is_file()
    ]
    rows = [BASE_ROW, *experts] if base else list(experts)
    cells = {r: [t for t in tasks if not own_task_only or r in (BASE_ROW, t)] for r in rows}
    base_dir = ensure_demo_base(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    eval_sets = {t: load_eval_set(t, demo_dir, eval_set)[:limit] for t in tasks}
    max_new = {
        t: _EXTRA_NEW_TOKENS
        + max(len(tokenizer(a + END_OF_TURN, add_special_tokens=False)["input_ids"]) for _, a in s)
        for t, s in eval_sets.items()
    }
    jobs = [
        (row, t, i, [p for p, _ in eval_sets[t][i : i + batch_size]], max_new[t])
        for row in rows
        for t in cells[row]
        for i in range(0, len(eval_sets[t]), batch_size)
    ]
    predictions = {r: {t: [""] * len(eval_sets[t]) for t in cells[r]} for r in rows}
    adapter_dirs = {e: demo_dir / e for e in experts}

    start = time.perf_counter()
    total = sum(len(j[3]) for j in jobs)
    with tqdm(total=total, desc="eval", unit="prompt") as bar:
        if workers <= 1 or len(jobs) == 1:
            _init_worker(base_dir, adapter_dirs)
            results = (_run_job(*j) for j in jobs)
            for row, t, i, texts in results:
                predictions[row][t][i : i + len(texts)] = texts
                bar.update(len(texts))
        else:
            ctx = mp.get_context("spawn")  # fork after torch start-up can deadlock
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(base_dir, adapter_dirs)
            ) as pool:
                futures = [pool.submit(_run_job, *j) for j in jobs]
                for fut in as_completed(futures):
                    row, t, i, texts = fut.result()
                    predictions[row][t][i : i + len(texts)] = texts
                    bar.update(len(texts))
    seconds = time.perf_counter() - start

    accuracy = {
        r: {
            t: sum(
                answers_match(t, pred, ans)
                for pred, (_, ans) in zip(predictions[r][t], eval_sets[t], strict=True)
            )
            / max(1, len(eval_sets[t]))
            for t in cells[r]
        }
        for r in rows
    }
    return EvalTable(
        rows=rows,
        tasks=tasks,
        accuracy=accuracy,
        n_examples={t: len(s) for t, s in eval_sets.items()},
        predictions=predictions,
        seconds=seconds,
        eval_set=eval_set,
        pairs=eval_sets,
    )


def format_table(table: EvalTable) -> str:
    """Render the table as Markdown: one row per model, one column per task, in percent.

    Args:
        table: the result of `evaluate`.

    Returns:
        The Markdown text, with the number of examples per task in the header.
    """
    labels = [r if r == BASE_ROW else f"{r} expert" for r in table.rows]
    first = max(len("model"), *map(len, labels))
    headers = [f"{t} (n={table.n_examples[t]})" for t in table.tasks]
    widths = [max(len(h), 6) for h in headers]

    def line(label: str, cells: list[str]) -> str:
        padded = (c.rjust(w) for c, w in zip(cells, widths, strict=True))
        return f"| {label.ljust(first)} | " + " | ".join(padded) + " |"

    lines = [
        line("model", headers),
        "|" + "-" * (first + 2) + "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
    ]
    for row, label in zip(table.rows, labels, strict=True):
        cells = [
            f"{100 * table.accuracy[row][t]:.1f}" if t in table.accuracy[row] else "-"
            for t in table.tasks
        ]
        lines.append(line(label, cells))
    return "\n".join(lines)


def breakdown(table: EvalTable) -> dict[str, dict[str, tuple[int, int]]]:
    """Each expert on its own task, per sub-category (`categorize`).

    Returns:
        task -> category -> (correct, total), for every task whose expert is a row.
    """
    assert table.pairs is not None, "the table holds no prompts"
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for task in table.tasks:
        if task not in table.rows or task not in table.predictions[task]:
            continue
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for pred, (prompt, answer) in zip(
            table.predictions[task][task], table.pairs[task], strict=True
        ):
            c = counts[categorize(task, prompt, answer)]
            c[0] += answers_match(task, pred, answer)
            c[1] += 1
        out[task] = {k: (v[0], v[1]) for k, v in sorted(counts.items())}
    return out


def format_breakdown(table: EvalTable) -> str:
    """`breakdown` as Markdown lines: task, sub-category, accuracy (correct / total)."""
    lines = ["| expert (own task) | sub-category | exact match |", "|---|---|---:|"]
    for task, cats in breakdown(table).items():
        for cat, (ok, n) in cats.items():
            lines.append(f"| {task} | {cat} | {100 * ok / n:.1f} ({ok}/{n}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m adapters.zoo.evaluate --cache-dir DIR [--limit N]`: print the accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True,
                        help="folder of the converted base model (`dynamerge zoo eval` passes "
                        "DYNAMERGE_CACHE_DIR)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--predictions", type=Path, default=None, help="write them as JSON")
    parser.add_argument("--set", dest="eval_set", choices=tuple(EVAL_SETS), default="eval",
                        help="generated held-out prompts, or the hand-written paraphrases")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="columns")
    parser.add_argument("--experts", nargs="*", choices=TASKS, default=None, help="rows")
    parser.add_argument("--own-task-only", action="store_true",
                        help="each expert on its own task only (the diagonal)")
    parser.add_argument("--no-base", action="store_true", help="leave out the base row")
    parser.add_argument("--breakdown", action="store_true",
                        help="each expert on its own task per sub-category")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    table = evaluate(
        args.cache_dir, limit=args.limit, tasks=args.tasks, experts=args.experts,
        demo_dir=args.demo_dir, workers=args.workers, batch_size=args.batch_size,
        eval_set=args.eval_set, own_task_only=args.own_task_only, base=not args.no_base,
    )
    if args.predictions:
        args.predictions.write_text(json.dumps(
            {"set": table.eval_set, "pairs": table.pairs, "predictions": table.predictions},
            indent=1,
        ))
    print(f"set: {table.eval_set}")
    print(format_table(table))
    if args.breakdown:
        print()
        print(format_breakdown(table))
    print(f"\n({table.seconds:.0f} s)")


if __name__ == "__main__":
    main()
