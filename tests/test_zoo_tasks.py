"""The demo zoo's task generators and the shipped demo folders (no model is loaded)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters.zoo.tasks import TASKS, TEMPLATE_COUNTS, answers_match, make_splits
from adapters.zoo.train import DEMO_DIR, N_EVAL, N_EXEMPLARS

MAX_ADAPTER_BYTES = 5 * 1024 * 1024


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_per_seed(task: str) -> None:
    a = make_splits(task, 40, 10, 10, seed=3)
    b = make_splits(task, 40, 10, 10, seed=3)
    c = make_splits(task, 40, 10, 10, seed=4)
    assert a == b
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_held_out_sets_do_not_depend_on_train_size(task: str) -> None:
    small = make_splits(task, 50, 64, 128)
    large = make_splits(task, 500, 64, 128)
    train = {e.prompt for e in large.train}
    exemplars = {e.prompt for e in large.exemplars}
    held_out = {e.prompt for e in large.eval}
    assert (len(train), len(exemplars), len(held_out)) == (500, 64, 128)  # no duplicates
    assert not train & exemplars
    assert not train & held_out
    assert not exemplars & held_out
    assert small.eval == large.eval
    assert small.exemplars == large.exemplars


@pytest.mark.parametrize("task", TASKS)
def test_every_phrasing_is_used(task: str) -> None:
    assert TEMPLATE_COUNTS[task] >= 5
    splits = make_splits(task, 400)
    used = {e.template for e in splits.train}
    assert used == set(range(TEMPLATE_COUNTS[task]))
    assert {e.template for e in splits.eval} == used


def _check_answer(task: str, prompt: str, answer: str) -> None:
    """Each task's answer has its exact form and follows from the prompt."""
    if task == "arithmetic":
        a, b = map(int, re.findall(r"\d+", prompt))
        assert int(answer) in (a + b, abs(a - b))
        assert answer == str(int(answer))
    elif task == "sentiment":
        assert answer in ("positive", "negative")
    elif task == "json_extract":
        obj = json.loads(answer)
        assert set(obj) == {"name", "age"}
        assert isinstance(obj["name"], str) and obj["name"] in prompt
        assert isinstance(obj["age"], int) and str(obj["age"]) in prompt
        assert answer == json.dumps(obj)
    elif task == "reverse_words":
        words = answer.split(" ")
        assert 3 <= len(words) <= 5
        assert " ".join(reversed(words)) in prompt
    elif task == "unit_convert":
        (value,) = map(int, re.findall(r"\d+", prompt))
        assert int(answer) % value == 0 and int(answer) > value
    elif task == "spell":
        assert re.fullmatch(r"[a-z](-[a-z])+", answer)
        assert answer.replace("-", "") in prompt
    else:
        raise AssertionError(f"no check for {task}")


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_well_formed(task: str) -> None:
    splits = make_splits(task, 300)
    for ex in [*splits.train, *splits.exemplars, *splits.eval]:
        assert ex.answer == ex.answer.strip() and ex.answer
        _check_answer(task, ex.prompt, ex.answer)


def test_answers_match_is_strict_but_parses_json() -> None:
    assert answers_match("arithmetic", " 85\n", "85")
    assert not answers_match("arithmetic", "The answer is 85", "85")
    ref = '{"name": "Maria", "age": 34}'
    assert answers_match("json_extract", '{"age":34, "name":"Maria"}', ref)
    assert not answers_match("json_extract", '{"name": "Maria", "age": "34"}', ref)
    assert not answers_match("json_extract", "Maria, 34", ref)


def test_unknown_task_is_named() -> None:
    with pytest.raises(ValueError, match="'poetry'"):
        make_splits("poetry", 1)


def test_generators_do_not_touch_the_global_random_state() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_splits("arithmetic", 20)
    assert random.random() == expected


# --------------------------------------------------------------------------------------------
# the committed demo zoo


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", TASKS)
def test_demo_folder_holds_adapter_exemplars_and_eval(task: str) -> None:
    folder = DEMO_DIR / task
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "exemplars.jsonl",
        "eval.jsonl",
        "paraphrases.jsonl",  # written by hand; tests/test_paraphrases.py checks it
    }
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] > 0

    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < MAX_ADAPTER_BYTES
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}

    exemplars = _lines(folder / "exemplars.jsonl")
    held_out = _lines(folder / "eval.jsonl")
    assert len(exemplars) >= 50 and all(set(r) == {"text"} for r in exemplars)
    assert len(held_out) >= 100 and all(set(r) == {"prompt", "answer"} for r in held_out)
    assert not {r["text"] for r in exemplars} & {r["prompt"] for r in held_out}


@pytest.mark.parametrize("task", TASKS)
def test_demo_data_is_what_the_generators_produce(task: str) -> None:
    """The shipped sets come from seed 0, so training data (same stream) never overlaps them."""
    splits = make_splits(task, 0, N_EXEMPLARS, N_EVAL, seed=0)
    folder = DEMO_DIR / task
    assert [r["text"] for r in _lines(folder / "exemplars.jsonl")] == [
        e.prompt for e in splits.exemplars
    ]
    assert _lines(folder / "eval.jsonl") == [
        {"prompt": e.prompt, "answer": e.answer} for e in splits.eval
    ]
