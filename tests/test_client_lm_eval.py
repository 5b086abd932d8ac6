"""lm-eval's `local-completions` against a live server on loopback, on tiny task files written
here: a multiple-choice task (loglikelihood: echo, logprobs 1, max_tokens 1, prompts as
token ids) and a generate_until task. Each choice's loglikelihood equals a plain transformers
forward (base) or PEFT's (a named adapter) within 1e-3 (a sum of ~10 fp32 logprobs)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server import LiveServer
from transformers import AutoModelForCausalLM

from adapters.zoo.micro import MicroZoo
from app.engine.engine import Engine
from app.main import create_app

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task files are local
lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "What is 2 plus 3?", "choices": ["five", "seven", "nine"], "answer": 0},
    {"question": "How many grams in a pound?", "choices": ["454", "12"], "answer": 0},
    {"question": "A recipe for bread needs", "choices": ["flour", "sand", "ink"],
     "answer": 0},
]


@pytest.fixture(scope="module")
def url(micro_engine: Engine) -> Iterator[str]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield live.url


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: \"{{question}}\"\n")
    (root / "mc.yaml").write_text(
        "task: dynamerge_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: dynamerge_gen\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"{{choices[answer]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def _evaluate(url: str, model: str, zoo: MicroZoo, tasks: Path, names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"model={model},base_url={url}/v1/completions,tokenizer={zoo.base_dir},"
                    "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,"
                    "max_retries=1,max_length=512"),
        tasks=names, task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        limit=None, bootstrap_iters=0,
    )


def _loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """As lm-eval's TemplateLM encodes a pair: trailing spaces of the context move to the
    continuation; the continuation's ids are the whole's beyond the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)
    return float(sum(logprobs[p - 1, whole[p]] for p in range(start, len(whole))))


@pytest.mark.parametrize("named", [False, True], ids=["base", "adapter"])
def test_loglikelihood_and_generation_tasks_run_and_match_the_model(
    url: str, micro_engine: Engine, micro_zoo: MicroZoo, tasks: Path, named: bool
) -> None:
    from peft import PeftModel

    model_id = micro_zoo.adapter_ids[0] if named else "base"
    out = _evaluate(url, model_id, micro_zoo, tasks, ["dynamerge_mc", "dynamerge_gen"])
    assert 0.0 <= out["results"]["dynamerge_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["dynamerge_gen"]
    generated = [s["resps"][0][0] for s in out["samples"]["dynamerge_gen"]]
    assert len(generated) == len(DOCS) and all(isinstance(g, str) for g in generated)

    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32).eval()
    if named:
        model = PeftModel.from_pretrained(model, micro_zoo.store_dir / model_id).eval()
    samples = out["samples"]["dynamerge_mc"]
    assert sum(len(s["arguments"]) for s in samples) == sum(len(d["choices"]) for d in DOCS)
    for sample in samples:
        for arguments, resp in zip(_pairs(sample["arguments"]), sample["resps"], strict=True):
            want = _loglikelihood(model, micro_engine.tokenizer, *arguments)
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-3)


def _pairs(arguments: object) -> list[tuple[str, str]]:
    """(context, continuation) per request: lists, or {"gen_args_i": {"arg_0", "arg_1"}}."""
    if isinstance(arguments, dict):
        arguments = [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
    return [(a[0], a[1]) for a in arguments]
