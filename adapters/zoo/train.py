"""Train the demo zoo: one PEFT LoRA adapter per task, on CPU, from generated data.

Each example is rendered through the base model's chat template (user message = prompt) and
the model learns the exact answer followed by `<|im_end|>`; the loss covers only those answer
tokens. Tasks are spread over worker processes with one thread each: on a small CPU box one
process per core trains faster than one process with several threads, because a 135M model's
matrices are too small to keep several threads busy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.zoo.base import ensure_demo_base
from adapters.zoo.tasks import PARAPHRASES_FILE, TASKS, Example, make_splits

__all__ = [
    "DEFAULT_STEPS",
    "DEMO_DIR",
    "END_OF_TURN",
    "TASK_SETTINGS",
    "TrainConfig",
    "TrainResult",
    "encode_prompt",
    "main",
    "task_config",
    "train",
    "train_task",
]

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
END_OF_TURN = "<|im_end|>"
# Written into adapter_config.json instead of the local cache path, which means nothing on
# another machine: the converted checkpoint is exactly this model.
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Held-out sizes; fixed so that changing the training budget never changes the eval sets.
# Exemplars drive the routing of free phrasings, so each task has many.
N_EXEMPLARS = 128
N_EVAL = 128
# Optimizer steps per task: only as many as each needs, within a few hours of one CPU core.
# Arithmetic with carries and borrows over three digits is the hard part for a 135M model
# (45% exact match on its eval set after 400 steps); spelling from memory and the x60 / x24
# time conversions come next; sentiment and JSON extraction are learned in tens of steps.
# One process on one core with bf16 autocast: ~1.2 s per step of 8 short examples
# (sentiment's longer prompts ~2 s).
DEFAULT_STEPS: dict[str, int] = {
    "arithmetic": 1000,
    "sentiment": 100,
    "json_extract": 100,
    "reverse_words": 300,
    "unit_convert": 700,
    "spell": 400,
}
# Per-task departures from `TrainConfig` (any of its fields but `steps`).
TASK_SETTINGS: dict[str, dict[str, object]] = {}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters shared by every task's adapter."""

    steps: int = 120
    """Optimizer steps (`train` takes per-task budgets, `DEFAULT_STEPS`, unless told)."""
    batch_size: int = 8
    """Examples per step (padded to the longest in the batch)."""
    lr: float = 2e-3
    """Peak AdamW learning rate; linear warm-up then cosine decay to 10% of it."""
    warmup_steps: int = 8
    """Steps of linear warm-up."""
    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA alpha; the scaling is alpha / r."""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    """Linear layers that receive a LoRA pair."""
    n_train: int = 12000
    """Training examples generated per task, at most: fewer when the task has fewer distinct
    prompts; cycled through in reshuffled epochs when the steps need more."""
    seed: int = 0
    """Seed of the data generators, the LoRA init and the batch order."""
    bf16_autocast: bool = True
    """Run forward and backward under bf16 autocast (the LoRA weights and the optimizer stay
    float32): twice as fast on a CPU with AVX512-BF16, and the adapter is saved in bf16."""


def task_config(task: str, base: TrainConfig | None = None) -> TrainConfig:
    """The hyper-parameters `train` uses for one task: its steps and settings over `base`."""
    cfg = base or TrainConfig()
    return replace(cfg, steps=DEFAULT_STEPS[task], **TASK_SETTINGS.get(task, {}))


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What training one task produced."""

    task: str
    out_dir: Path
    seconds: float  # wall time of the optimisation loop alone
    seconds_per_step: float
    first_loss: float  # mean loss of the first 10 steps
    last_loss: float  # mean loss of the last 10 steps
    losses: list[float] = field(repr=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user prompt rendered through the chat template, ready for the answer.

    Args:
        tokenizer: the base model's tokenizer (it holds the chat template).
        prompt: the user message.

    Returns:
        The ids, ending with the assistant header the answer follows.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]


def _encode_example(tokenizer, ex: Example) -> tuple[list[int], int]:
    """Prompt + answer ids and the number of prompt ids.

    The answer is tokenized on its own, as the model will produce it after the assistant
    header at inference time; tokenizing the joined string could merge tokens across the
    boundary and teach a split the model never sees when it generates.
    """
    prompt_ids = encode_prompt(tokenizer, ex.prompt)
    answer_ids = tokenizer(ex.answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def _collate(
    encoded: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest member.

    Returns:
        input_ids [batch, seq], attention_mask [batch, seq], and answer_mask [batch, seq]
        marking the positions whose NEXT token is an answer token (where loss is taken).
    """
    longest = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), longest), dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), longest), dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        answer_mask[row, n_prompt - 1 : len(ids) - 1] = True
    return input_ids, attention, answer_mask


def _answer_loss(
    causal_lm, input_ids: torch.Tensor, attention: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy on the answer tokens only.

    The LM head (49k x 576, a fifth of the model) runs only on the few positions that predict
    an answer token instead of on every prompt position, which saves a good share of each step.
    """
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    logits = causal_lm.lm_head(hidden[answer_mask])
    targets = input_ids[:, 1:][answer_mask[:, :-1]]
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_task(
    task: str,
    base_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    progress_position: int = 0,
) -> TrainResult:
    """Train one task's LoRA adapter and write its demo folder.

    Args:
        task: one of `TASKS`.
        base_dir: the converted base checkpoint (`ensure_demo_base()`).
        out_dir: the folder to (re)write: adapter_config.json, adapter_model.safetensors
            (bf16), exemplars.jsonl and eval.jsonl.
        cfg: hyper-parameters.
        progress_position: line of the terminal this task's progress bar uses.

    Returns:
        Timings and losses.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    splits = make_splits(task, cfg.n_train, N_EXEMPLARS, N_EVAL, seed=cfg.seed, allow_fewer=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    causal_lm = peft_model.get_base_model()  # the LlamaForCausalLM, LoRA layers injected

    encoded = [_encode_example(tokenizer, ex) for ex in splits.train]
    order_rng = random.Random(f"order:{task}:{cfg.seed}")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))

    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {task}", position=progress_position, leave=True)
    for _ in bar:
        if len(order) < cfg.batch_size:  # a new epoch, reshuffled
            fresh = list(range(len(encoded)))
            order_rng.shuffle(fresh)
            order.extend(fresh)
        batch = [encoded[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        input_ids, attention, answer_mask = _collate(batch, tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss = _answer_loss(causal_lm, input_ids, attention, answer_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - start

    _write_demo_dir(peft_model, splits.exemplars, splits.eval, out_dir, task)
    window = min(10, len(losses))
    return TrainResult(
        task=task,
        out_dir=out_dir,
        seconds=seconds,
        seconds_per_step=seconds / max(1, cfg.steps),
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        losses=losses,
    )


def _write_demo_dir(
    peft_model, exemplars: list[Example], eval_set: list[Example], out_dir: Path, task: str
) -> None:
    """Write the adapter (bf16 safetensors), its exemplars and its eval set atomically.

    The hand-written `paraphrases.jsonl` is no output of training: it is kept, or copied from
    the shipped demo folder when `out_dir` is elsewhere (a trial run), so it can be scored.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for source in (out_dir / PARAPHRASES_FILE, DEMO_DIR / task / PARAPHRASES_FILE):
        if source.is_file():
            shutil.copyfile(source, tmp / PARAPHRASES_FILE)
            break
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    # The embedding is not trained; saying so skips PEFT's look-up of the base config by name.
    peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    weights = tmp / "adapter_model.safetensors"
    # bf16 halves the committed size; the registry upcasts on load.
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes through a private temp file
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card template, all blanks
    with (tmp / "exemplars.jsonl").open("w") as f:
        for ex in exemplars:
            f.write(json.dumps({"text": ex.prompt}) + "\n")
    with (tmp / "eval.jsonl").open("w") as f:
        for ex in eval_set:
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


# --------------------------------------------------------------------------------------------
# several tasks in worker processes

_worker_slot = 0


def _init_worker(counter, lock) -> None:
    """Pin the worker to one thread and give it a progress-bar line of its own."""
    global _worker_slot
    torch.set_num_threads(1)
    with lock:
        _worker_slot = counter.value
        counter.value += 1


def _train_in_worker(task: str, base_dir: Path, out_root: Path, cfg: TrainConfig) -> TrainResult:
    return train_task(task, base_dir, out_root / task, cfg, progress_position=_worker_slot)


def train(
    tasks: Sequence[str] | None = None,
    out_dir: Path = DEMO_DIR,
    steps: int | Mapping[str, int] | None = None,
    workers: int = 2,
    cache_dir: Path | None = None,
    config: TrainConfig | None = None,
    overrides: Mapping[str, object] | None = None,
) -> list[TrainResult]:
    """Train the demo adapters, one per task, in parallel worker processes.

    Args:
        tasks: which tasks; all of `TASKS` when None.
        out_dir: parent folder; each task is written to `out_dir/<task>/`.
        steps: optimizer steps, the same for every task (int) or per task (mapping);
            `DEFAULT_STEPS` when None.
        workers: worker processes, each on one thread (match the number of cores).
        cache_dir: cache folder of the converted base model.
        config: the other hyper-parameters, for every task; when None, each task's
            `task_config` (`TrainConfig()` with its `TASK_SETTINGS`), which is what the
            committed demo zoo was trained with.
        overrides: `TrainConfig` fields set on top of either, e.g. `{"lr": 1e-3}`.

    Returns:
        One result per task, in the order of `tasks`.
    """
    tasks = list(tasks) if tasks else list(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    budgets = steps if steps is not None else DEFAULT_STEPS
    configs = {
        t: replace(
            config or task_config(t),
            steps=budgets if isinstance(budgets, int) else budgets[t],
            **(overrides or {}),
        )
        for t in tasks
    }
    base_dir = ensure_demo_base(cache_dir)  # once, here, not raced by the workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("training %s", configs)

    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        torch.set_num_threads(1)
        return [train_task(t, base_dir, out_dir / t, configs[t]) for t in tasks]
    # spawn, not fork: forking a process that already initialised torch's thread pools can
    # deadlock, and spawn behaves the same on every OS.
    ctx = mp.get_context("spawn")
    counter, lock = ctx.Value("i", 0), ctx.Lock()
    # Longest budgets first, so the workers finish close together.
    by_cost = sorted(tasks, key=lambda t: -configs[t].steps)
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, lock)
    ) as pool:
        futures = {
            t: pool.submit(_train_in_worker, t, base_dir, out_dir, configs[t]) for t in by_cost
        }
        return [futures[t].result() for t in tasks]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m adapters.zoo.train [--tasks ...] [--steps N]`: train and save the demo zoo."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    parser.add_argument("--steps", type=int, default=None, help="the same for every task")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {defaults.batch_size}")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"default {defaults.lr}, or the task's TASK_SETTINGS")
    parser.add_argument("--rank", type=int, default=None,
                        help=f"default {defaults.rank}, or the task's TASK_SETTINGS")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    given = {"batch_size": args.batch_size, "lr": args.lr, "rank": args.rank}
    overrides = {k: v for k, v in given.items() if v is not None}
    if "rank" in overrides:
        overrides["alpha"] = 2 * overrides["rank"]
    start = time.perf_counter()
    results = train(
        args.tasks, out_dir=args.out_dir, steps=args.steps, workers=args.workers,
        overrides=overrides,
    )
    for r in results:
        print(
            f"{r.task:14s} loss {r.first_loss:.3f} -> {r.last_loss:.3f}  "
            f"{r.seconds_per_step:.2f} s/step  {r.seconds:.0f} s"
        )
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
