"""Exact-match accuracy of the demo base model and of every demo expert on every task.

Rows are the base model (adapters disabled) and each expert alone; columns are the tasks'
held-out `eval.jsonl` sets. Generation is greedy and batched with left padding, through PEFT
with every adapter loaded once (`set_adapter` / `disable_adapter()`), so the numbers describe
the committed bf16 adapter files exactly as a PEFT user would load them.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.zoo.base import ensure_demo_base
from adapters.zoo.tasks import TASKS, answers_match
from adapters.zoo.train import DEMO_DIR, END_OF_TURN, encode_prompt

__all__ = ["BASE_ROW", "EvalTable", "evaluate", "format_table", "load_eval_set", "main"]

logger = logging.getLogger(__name__)

BASE_ROW = "base"
# Tokens allowed beyond the longest reference answer: enough to see an answer end, few enough
# that a chatty model does not spend the evaluation writing paragraphs.
_EXTRA_NEW_TOKENS = 4


@dataclass(frozen=True, slots=True)
class EvalTable:
    """Accuracy of each model (row) on each task (column)."""

    rows: list[str]  # "base", then one expert per adapter
    tasks: list[str]
    accuracy: dict[str, dict[str, float]]  # row -> task -> fraction correct in [0, 1]
    n_examples: dict[str, int]  # task -> eval examples scored
    predictions: dict[str, dict[str, list[str]]]  # row -> task -> generated texts, in order
    seconds: float


def load_eval_set(task: str, demo_dir: Path = DEMO_DIR) -> list[tuple[str, str]]:
    """Read a task's `eval.jsonl`.

    Args:
        task: the task folder name.
        demo_dir: the zoo folder.

    Returns:
        (prompt, answer) pairs in file order.
    """
    path = Path(demo_dir) / task / "eval.jsonl"
    with path.open() as f:
        return [(r["prompt"], r["answer"]) for r in map(json.loads, f) if r]


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
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    experts: Sequence[str] | None = None,
    demo_dir: Path = DEMO_DIR,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
) -> EvalTable:
    """Score the base model and every expert on every task's eval set.

    Args:
        limit: score only the first `limit` examples of each eval set (all when None).
        tasks: the columns; every task with a folder in `demo_dir` when None.
        experts: the adapter rows; the same folders when None.
        demo_dir: the zoo folder (`<task>/adapter_*`, `<task>/eval.jsonl`).
        cache_dir: cache folder of the converted base model.
        batch_size: prompts per generate call.
        workers: worker processes, one thread each.

    Returns:
        The accuracy table with every prediction.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    demo_dir = Path(demo_dir)
    present = [t for t in TASKS if (demo_dir / t / "eval.jsonl").is_file()]
    tasks = list(tasks) if tasks else present
    experts = list(experts) if experts is not None else present
    rows = [BASE_ROW, *experts]
    base_dir = ensure_demo_base(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    eval_sets = {t: load_eval_set(t, demo_dir)[:limit] for t in tasks}
    max_new = {
        t: _EXTRA_NEW_TOKENS
        + max(len(tokenizer(a + END_OF_TURN, add_special_tokens=False)["input_ids"]) for _, a in s)
        for t, s in eval_sets.items()
    }
    jobs = [
        (row, t, i, [p for p, _ in eval_sets[t][i : i + batch_size]], max_new[t])
        for row in rows
        for t in tasks
        for i in range(0, len(eval_sets[t]), batch_size)
    ]
    predictions = {r: {t: [""] * len(eval_sets[t]) for t in tasks} for r in rows}
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
            for t in tasks
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
        lines.append(line(label, [f"{100 * table.accuracy[row][t]:.1f}" for t in table.tasks]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m adapters.zoo.evaluate [--limit N]`: print the accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="examples per task")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--predictions", type=Path, default=None, help="write them as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    table = evaluate(
        limit=args.limit, demo_dir=args.demo_dir, workers=args.workers, batch_size=args.batch_size
    )
    if args.predictions:
        args.predictions.write_text(json.dumps(table.predictions, indent=1))
    print(format_table(table))
    print(f"\n({table.seconds:.0f} s)")


if __name__ == "__main__":
    main()
