"""The demo zoo's task generators and the shipped demo folders (no model is loaded)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import fields
from decimal import Decimal
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters.zoo.tasks import (
    TASKS,
    TEMPLATE_COUNTS,
    UNIT_PAIRS,
    UNIT_WORDS,
    Example,
    answers_match,
    format_number,
    make_splits,
    normalise_prompt,
    parse_number,
    reserved_prompts,
)
from adapters.zoo.train import DEMO_DIR, N_EVAL, N_EXEMPLARS, task_config

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
    assert TEMPLATE_COUNTS[task] >= 17
    splits = make_splits(task, 1500)
    used = {e.template for e in splits.train}
    assert used == set(range(TEMPLATE_COUNTS[task]))
    held_out = {e.template for e in [*splits.eval, *splits.exemplars]}
    assert len(held_out) >= 0.9 * TEMPLATE_COUNTS[task]


def test_instructions_are_restyled_but_payloads_never() -> None:
    """Some prompts are all lowercase, some shout, some greet: the word to spell stays as is."""
    prompts = [e.prompt for e in make_splits("spell", 1500).train]
    assert any(p == p.lower() for p in prompts)
    assert any(re.search(r"\b[A-Z]{5,}\b", p) for p in prompts)
    assert any(p.startswith(("Hi", "Hello", "Hey", "Quick question")) for p in prompts)
    assert any(p.endswith(("Thanks!", "Thank you.", "Cheers.")) for p in prompts)


_CUE_WORDS = re.compile(
    r"\b(love|fantastic|best|exceeded|wonderful|brilliant|superb|excellent|great|regret|"
    r"terrible|worst|disappointment|awful|dreadful|useless|poorly|unhappy|bad|stars?)\b",
    re.IGNORECASE,
)
_FACTORS = {factor for _, _, _, factor in UNIT_PAIRS}


def _check_answer(task: str, ex: Example) -> None:
    """Each task's answer has its exact form and follows from the prompt."""
    prompt, answer = ex.prompt, ex.answer
    if task == "arithmetic":
        a, b = map(int, re.findall(r"\d+", prompt))
        op = ex.category.split()[0]
        assert answer == str({"add": a + b, "sub": max(a, b) - min(a, b), "mul": a * b}[op])
        assert max(a, b) <= 999 and min(a, b) >= 1
        if op == "mul":
            assert min(a, b) <= 9 or max(a, b) <= 12
    elif task == "sentiment":
        label, kind = ex.category.split()
        assert answer == label and answer in ("positive", "negative")
        if kind == "plain":  # the polarity is in the facts alone
            review = prompt.split(":", 1)[-1]
            assert not _CUE_WORDS.search(review), prompt
    elif task == "json_extract":
        obj = json.loads(answer)
        assert list(obj) == ["name", "age"] and answer == json.dumps(obj)
        assert isinstance(obj["name"], str) and re.search(rf"\b{obj['name']}\b", prompt)
        assert isinstance(obj["age"], int) and re.search(rf"\b{obj['age']}\b", prompt)
        assert 3 <= obj["age"] <= 99
    elif task == "reverse_words":
        words = answer.split(" ")
        assert 3 <= len(words) <= 6 and all(words)
        assert " ".join(reversed(words)) in prompt
    elif task == "unit_convert":
        (value,) = map(Decimal, re.findall(r"\d+(?:\.\d+)?", prompt))
        got = Decimal(answer)
        assert format_number(got) == answer  # canonical: no trailing zeros, no separators
        up = ex.category.endswith(" up")
        assert (got / value if up else value / got) in _FACTORS
        after = re.search(rf"{re.escape(format_number(value))} ([a-z]+)", prompt.lower())
        assert after and after.group(1) in UNIT_WORDS, prompt
    elif task == "spell":
        assert re.fullmatch(r"[a-z](-[a-z])+", answer)
        assert re.search(rf"\b{answer.replace('-', '')}\b", prompt)
    else:
        raise AssertionError(f"no check for {task}")


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_well_formed(task: str) -> None:
    splits = make_splits(task, 1000)
    for ex in [*splits.train, *splits.exemplars, *splits.eval]:
        assert ex.answer == ex.answer.strip() and ex.answer
        _check_answer(task, ex)


def test_arithmetic_and_units_cover_their_ranges() -> None:
    arithmetic = {e.category for e in make_splits("arithmetic", 1000).train}
    assert arithmetic >= {f"{op} {d}-digit" for op in ("add", "sub") for d in (1, 2, 3)}
    assert arithmetic >= {"mul table", "mul 1-digit x 1-digit", "mul 2-digit x 1-digit"}
    units = {e.category for e in make_splits("unit_convert", 1000).train}
    assert units == {f"{f} {d}" for f in ("length", "mass", "volume", "time", "money")
                     for d in ("up", "down")}
    sentiment = {e.category for e in make_splits("sentiment", 1000).train}
    assert sentiment == {f"{label} {kind}" for label in ("positive", "negative")
                         for kind in ("plain", "cue")}


def test_answers_match_is_strict_but_reads_numbers_and_json() -> None:
    assert answers_match("arithmetic", " 85\n", "85")
    assert not answers_match("arithmetic", "The answer is 85", "85")
    assert not answers_match("arithmetic", "86", "85")
    for same in ("1,000", "1000", "1000.0", "1000.", " 1000 "):
        assert answers_match("unit_convert", same, "1000"), same
        assert answers_match("arithmetic", same, "1000"), same
    assert answers_match("unit_convert", "2.50", "2.5")
    assert answers_match("unit_convert", ".75", "0.75")
    for wrong in ("1000 grams", "1 000", "10,00", "1e3", "", "1000 1000"):
        assert not answers_match("unit_convert", wrong, "1000"), wrong
    assert not answers_match("reverse_words", "1,000", "1000")  # only the numeric tasks
    ref = '{"name": "Maria", "age": 34}'
    assert answers_match("json_extract", '{"age":34, "name":"Maria"}', ref)
    assert not answers_match("json_extract", '{"name": "Maria", "age": "34"}', ref)
    assert not answers_match("json_extract", "Maria, 34", ref)


def test_numbers_have_one_canonical_form() -> None:
    assert format_number(2000) == "2000"
    assert format_number(Decimal("2.50")) == "2.5"
    assert format_number(Decimal("0.750")) == "0.75"
    assert format_number(Decimal("1E+3")) == "1000"
    assert format_number(Decimal("2.5") * 1000) == "2500"
    assert parse_number("1,000.50") == Decimal("1000.5")
    assert parse_number("12 kg") is None


def test_splits_leave_out_excluded_and_hand_written_prompts() -> None:
    first = make_splits("arithmetic", 50, 10, 10, exclude=())
    taken = first.eval[0].prompt
    again = make_splits("arithmetic", 50, 10, 10, exclude={normalise_prompt(taken)})
    assert taken not in {e.prompt for e in [*again.train, *again.exemplars, *again.eval]}
    assert again.eval[:-1] == first.eval[1:]  # the stream goes on past the excluded prompt
    reserved = reserved_prompts()
    assert len(reserved) >= 6 * 40
    assert normalise_prompt("  What is 7 times 8 ") in reserved


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
    # `python -m adapters.zoo.train` reproduces what is committed: the same per-task settings
    cfg = task_config(task)
    assert (config["r"], config["lora_alpha"]) == (cfg.rank, cfg.alpha)
    assert set(config["target_modules"]) == set(cfg.targets)

    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < MAX_ADAPTER_BYTES
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}

    exemplars = _lines(folder / "exemplars.jsonl")
    held_out = _lines(folder / "eval.jsonl")
    assert len(exemplars) == N_EXEMPLARS and all(set(r) == {"text"} for r in exemplars)
    assert len(held_out) == N_EVAL and all(set(r) == {"prompt", "answer"} for r in held_out)
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


def test_per_task_settings_name_real_fields() -> None:
    from adapters.zoo.train import DEFAULT_STEPS, TASK_SETTINGS, TrainConfig

    names = {f.name for f in fields(TrainConfig)} - {"steps"}
    assert set(DEFAULT_STEPS) == set(TASKS)
    for task, settings in TASK_SETTINGS.items():
        assert task in TASKS and set(settings) <= names, task
