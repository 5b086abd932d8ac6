"""The hand-written paraphrase sets and the out-of-domain prompt sets (no model is loaded).

`adapters/zoo/demo/<task>/paraphrases.jsonl` holds prompts written by hand, the way people
phrase these requests, not by the generators: they measure whether an expert (and the router)
generalises beyond the training templates. Every answer is recomputed here from the prompt,
with rules and unit tables of this file's own, so a wrong reference cannot hide behind the
code that produced it. None of them may appear in any task's training data, exemplars or eval
set, and the out-of-domain sets (router calibration, benchmark) share nothing with each other
or with the tasks.
"""

from __future__ import annotations

import json
import re
import string
from fractions import Fraction
from functools import cache
from pathlib import Path

import pytest

from adapters.zoo.tasks import TASKS, make_splits
from adapters.zoo.train import DEMO_DIR, N_EVAL, N_EXEMPLARS, task_config

ROOT = Path(__file__).resolve().parent.parent
OOD_SETS = {
    "calibration": ROOT / "router_index" / "ood_prompts.jsonl",
    "benchmark": ROOT / "bench" / "data" / "ood_eval.jsonl",
}
MIN_PARAPHRASES = 40


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _paraphrases(task: str) -> list[dict]:
    return _lines(DEMO_DIR / task / "paraphrases.jsonl")


def _normalise(text: str) -> str:
    """Lowercase, whitespace collapsed, punctuation stripped at both ends."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@cache
def _task_prompts(task: str) -> frozenset[str]:
    """Every prompt a task trains on, routes by or is scored on, as training draws them."""
    splits = make_splits(task, task_config(task).n_train, N_EXEMPLARS, N_EVAL, allow_fewer=True)
    prompts = {e.prompt for e in (*splits.train, *splits.exemplars, *splits.eval)}
    folder = DEMO_DIR / task
    prompts |= {r["text"] for r in _lines(folder / "exemplars.jsonl")}
    prompts |= {r["prompt"] for r in _lines(folder / "eval.jsonl")}
    return frozenset(prompts)


# --------------------------------------------------------------------------------------------
# answers recomputed from the prompt

_MULTIPLY = re.compile(r"\btimes\b|\bproduct\b|multipl|\beach\b|\d\s*[x*]\s*\d")
_SUBTRACT = re.compile(
    r"minus|take away|\baway\b|subtract|\bless\b|difference|\bleft\b|remain|\d\s*-\s*\d"
)
_ADD = re.compile(r"plus|\bsum\b|\badd|total|altogether|\bmore\b|\d\s*\+\s*\d")


def _arithmetic(prompt: str) -> int:
    a, b = map(int, re.findall(r"\d+", prompt))
    text = prompt.lower()
    if _MULTIPLY.search(text):
        return a * b
    if _SUBTRACT.search(text):
        return max(a, b) - min(a, b)  # the set asks for no negative results
    assert _ADD.search(text), f"no operation word in {prompt!r}"
    return a + b


# unit -> (quantity, size in a base unit of that quantity); feet and inches through metres
_UNITS: dict[str, tuple[str, Fraction]] = {}
for _names, _quantity, _size in [
    ("kilometer kilometers kilometre kilometres km", "length", Fraction(1000)),
    ("meter meters metre metres m", "length", Fraction(1)),
    ("centimeter centimeters centimetre centimetres cm", "length", Fraction(1, 100)),
    ("millimeter millimeters millimetre millimetres mm", "length", Fraction(1, 1000)),
    ("foot feet ft", "length", Fraction(3048, 10000)),
    ("inch inches", "length", Fraction(254, 10000)),
    ("tonne tonnes", "mass", Fraction(10**6)),
    ("kilogram kilograms kg", "mass", Fraction(1000)),
    ("gram grams g", "mass", Fraction(1)),
    ("milligram milligrams mg", "mass", Fraction(1, 1000)),
    ("liter liters litre litres", "volume", Fraction(1)),
    ("milliliter milliliters millilitre millilitres ml", "volume", Fraction(1, 1000)),
    ("second seconds", "time", Fraction(1)),
    ("minute minutes", "time", Fraction(60)),
    ("hour hours", "time", Fraction(3600)),
    ("day days", "time", Fraction(86400)),
    ("week weeks", "time", Fraction(7 * 86400)),
    ("year years", "years", Fraction(1)),
    ("decade decades", "years", Fraction(10)),
    ("century centuries", "years", Fraction(100)),
]:
    for _name in _names.split():
        _UNITS[_name] = (_quantity, _size)


def _read_units(prompt: str) -> tuple[Fraction, str, str]:
    """The one number of the prompt, the unit that follows it, and the other unit named."""
    tokens = re.findall(r"\d+(?:\.\d+)?|[a-z]+", prompt.lower())
    (at,) = [i for i, t in enumerate(tokens) if t[0].isdigit()]
    src = tokens[at + 1]
    others = {t for i, t in enumerate(tokens) if t in _UNITS and i != at + 1}
    assert src in _UNITS and len(others) == 1, f"cannot read the units of {prompt!r}"
    (dst,) = others
    assert _UNITS[src][0] == _UNITS[dst][0], prompt
    return Fraction(tokens[at]), src, dst


def _unit_convert(prompt: str) -> Fraction:
    value, src, dst = _read_units(prompt)
    return value * _UNITS[src][1] / _UNITS[dst][1]


_CANONICAL_NUMBER = re.compile(r"0|[1-9]\d*|(?:0|[1-9]\d*)\.\d*[1-9]")


def _check(task: str, prompt: str, answer: str) -> None:
    if task == "arithmetic":
        assert answer == str(_arithmetic(prompt))
    elif task == "unit_convert":
        assert _CANONICAL_NUMBER.fullmatch(answer), answer
        assert Fraction(answer) == _unit_convert(prompt)
    elif task == "sentiment":
        assert answer in ("positive", "negative")
    elif task == "json_extract":
        obj = json.loads(answer)
        assert list(obj) == ["name", "age"] and answer == json.dumps(obj)
        assert isinstance(obj["name"], str) and re.search(rf"\b{obj['name']}\b", prompt)
        assert isinstance(obj["age"], int) and re.search(rf"\b{obj['age']}(\b|th\b)", prompt)
    elif task == "reverse_words":
        words = answer.split(" ")
        assert 3 <= len(words) <= 6 and all(words)
        assert re.search(rf"(^|[\s'\"]){re.escape(' '.join(reversed(words)))}($|[\s'\".?])",
                         prompt)
    elif task == "spell":
        assert re.fullmatch(r"[a-z](-[a-z])+", answer)
        assert re.search(rf"\b{answer.replace('-', '')}\b", prompt)
    else:
        raise AssertionError(f"no check for {task}")


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_enough_distinct_paraphrases(task: str) -> None:
    rows = _paraphrases(task)
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    prompts = [_normalise(r["prompt"]) for r in rows]
    assert len(set(prompts)) == len(prompts) >= MIN_PARAPHRASES


@pytest.mark.parametrize("task", TASKS)
def test_paraphrase_answers_follow_from_their_prompts(task: str) -> None:
    for row in _paraphrases(task):
        assert row["answer"] == row["answer"].strip() and row["answer"]
        _check(task, row["prompt"], row["answer"])


def test_paraphrases_cover_what_people_ask() -> None:
    arithmetic = [r["prompt"].lower() for r in _paraphrases("arithmetic")]
    for word in ("plus", "sum", "total", "minus", "take away", "less", "difference",
                 "subtract", "times", "product", "multiplied"):
        assert any(word in p for p in arithmetic), word
    operands = [n for p in arithmetic for n in re.findall(r"\d+", p)]
    assert {len(n) for n in operands} == {1, 2, 3}
    labels = [r["answer"] for r in _paraphrases("sentiment")]
    assert min(labels.count("positive"), labels.count("negative")) >= 0.4 * len(labels)
    units = [(_read_units(r["prompt"]), Fraction(r["answer"]))
             for r in _paraphrases("unit_convert")]
    assert {"length", "mass", "volume", "time"} <= {_UNITS[src][0] for (_, src, _), _ in units}
    downward = [value for (value, _, _), answer in units if answer < value]
    assert len(downward) >= len(units) // 3  # both directions, not only the easy one


@pytest.mark.parametrize("task", TASKS)
def test_no_paraphrase_is_in_any_task_data(task: str) -> None:
    prompts = [r["prompt"] for r in _paraphrases(task)]
    for other in TASKS:
        data = _task_prompts(other)
        normalised = {_normalise(p) for p in data}
        assert not set(prompts) & data, other
        assert not {_normalise(p) for p in prompts} & normalised, other


def test_ood_sets_are_disjoint_from_each_other_and_from_the_tasks() -> None:
    sets = {name: [r["text"] for r in _lines(path)] for name, path in OOD_SETS.items()}
    normalised = {name: {_normalise(t) for t in texts} for name, texts in sets.items()}
    for name, texts in sets.items():
        assert all(set(r) == {"text"} for r in _lines(OOD_SETS[name]))
        assert len(normalised[name]) == len(texts) >= 100, name
    assert not normalised["calibration"] & normalised["benchmark"]
    task_texts = {_normalise(p) for t in TASKS for p in _task_prompts(t)}
    task_texts |= {_normalise(r["prompt"]) for t in TASKS for r in _paraphrases(t)}
    for name in sets:
        assert not normalised[name] & task_texts, name
