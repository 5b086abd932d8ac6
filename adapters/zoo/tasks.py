"""Seeded generators for the six demo tasks of the embedded zoo.

Every task draws its prompts from several phrasings (templates), so that neither an expert nor
the router can latch onto one surface form. Generation is deterministic per seed, and the
train / exemplar / eval splits never share a prompt string.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "TASKS",
    "Example",
    "Splits",
    "answers_match",
    "generate_example",
    "make_splits",
]


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt with its exact expected answer."""

    task: str
    prompt: str
    answer: str
    template: int  # index into the task's phrasings, so tests can check every one is used


@dataclass(frozen=True, slots=True)
class Splits:
    """Disjoint splits of one task (no prompt string appears in two of them)."""

    train: list[Example]
    exemplars: list[Example]  # texts the router embeds for this task
    eval: list[Example]  # held out, scored by exact match


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# --------------------------------------------------------------------------------------------
# arithmetic: two-digit addition and subtraction (never negative, so answers are plain digits)

_ADD_TEMPLATES = (
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}. Reply with the number only.",
    "If you have {a} apples and get {b} more, how many apples do you have?",
)
_SUB_TEMPLATES = (
    "What is {a} minus {b}?",
    "Compute {a} - {b}.",
    "Subtract {b} from {a}.",
    "What is the difference between {a} and {b}?",
    "Calculate {a} - {b}. Reply with the number only.",
    "If you have {a} coins and spend {b}, how many coins are left?",
)
_ARITHMETIC_TEMPLATES = _ADD_TEMPLATES + _SUB_TEMPLATES


def _arithmetic(rng: random.Random) -> tuple[str, str, int]:
    t = rng.randrange(len(_ARITHMETIC_TEMPLATES))
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if t < len(_ADD_TEMPLATES):
        answer = a + b
    else:
        a, b = max(a, b), min(a, b)
        answer = a - b
    return _ARITHMETIC_TEMPLATES[t].format(a=a, b=b), str(answer), t


# --------------------------------------------------------------------------------------------
# sentiment: short product or film reviews assembled from polar phrases

_ITEMS = _words(
    """
    phone blender laptop jacket headphones toaster backpack lamp vacuum keyboard tent kettle
    watch camera chair mattress movie film thriller comedy documentary sequel cartoon drama
    """
)
_POSITIVE = (
    "I absolutely love this {item}.",
    "The {item} is fantastic and worth every penny.",
    "Best {item} I have bought in years.",
    "This {item} exceeded all my expectations.",
    "What a wonderful {item}, I would recommend it to anyone.",
    "The {item} works perfectly and looks great.",
    "I enjoyed every minute with this {item}.",
    "Brilliant {item}, simply delightful.",
    "Five stars, the {item} is superb.",
    "Such a pleasant surprise, the {item} is excellent.",
)
_NEGATIVE = (
    "I really regret buying this {item}.",
    "The {item} is terrible and a waste of money.",
    "Worst {item} I have ever had.",
    "This {item} was a huge disappointment.",
    "What an awful {item}, avoid it at all costs.",
    "The {item} broke after two days.",
    "I was bored the whole time with this {item}.",
    "Dreadful {item}, simply unbearable.",
    "One star, the {item} is useless.",
    "Sadly the {item} is cheap and poorly made.",
)
_SENTIMENT_TEMPLATES = (
    "Is this review positive or negative? {review}",
    "Classify the sentiment of this review as positive or negative: {review}",
    'Review: "{review}" What is the sentiment of the review?',
    "{review}\nWas this reviewer happy? Answer positive or negative.",
    "Tell me whether the following review is positive or negative.\n{review}",
    "Sentiment analysis (positive/negative): {review}",
)


def _sentiment(rng: random.Random) -> tuple[str, str, int]:
    positive = rng.random() < 0.5
    bank = _POSITIVE if positive else _NEGATIVE
    item = rng.choice(_ITEMS)
    first, second = rng.sample(bank, 2)
    # Half the reviews are one sentence, half two, so length is not a giveaway of anything.
    review = first.format(item=item)
    if rng.random() < 0.5:
        review += " " + second.format(item=item)
    t = rng.randrange(len(_SENTIMENT_TEMPLATES))
    label = "positive" if positive else "negative"
    return _SENTIMENT_TEMPLATES[t].format(review=review), label, t


# --------------------------------------------------------------------------------------------
# json_extract: name and age from one sentence

_NAMES = _words(
    """
    Maria John Aiko Pedro Fatima Liam Chen Olga Kwame Sofia Ahmed Emma Raj Lucia Noah Ingrid
    Tomas Amara Yuki Diego Hannah Omar Elena Victor Priya Lars Nadia Mateo Zara Felix Grace
    Ivan Leila Oscar Mei Samuel Anya Hugo Clara Ravi
    """
)
_CITIES = _words(
    """
    Lima Paris Tokyo Nairobi Oslo Toronto Cairo Madrid Berlin Sydney Mumbai Seoul Lisbon
    Dublin Quito Hanoi Vienna Accra Prague Denver
    """
)
_FACTS = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, works in {city}.",
    "Last year {name} moved to {city}; {name} is now {age} years old.",
    "In {city} lives {name}, who is {age}.",
    "{name} ({age}) is a teacher from {city}.",
)
_JSON_TEMPLATES = (
    "Extract the name and age as JSON: {fact}",
    "Return a JSON object with the keys name and age for this text: {fact}",
    "From the sentence below, give the person's name and age in JSON.\n{fact}",
    "Text: {fact}\nOutput the name and age as a JSON object.",
    "Parse the following into JSON with fields name and age: {fact}",
)


def _json_extract(rng: random.Random) -> tuple[str, str, int]:
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 89)
    fact = rng.choice(_FACTS).format(name=name, age=age, city=city)
    t = rng.randrange(len(_JSON_TEMPLATES))
    return _JSON_TEMPLATES[t].format(fact=fact), json.dumps({"name": name, "age": age}), t


# --------------------------------------------------------------------------------------------
# reverse_words: three to five common words in reverse order

_WORDS = _words(
    """
    blue sky over hills red car fast river green tree small house cold night bright moon old
    dog runs home sun rises early quiet lake big city lights soft rain falls slowly happy
    child sings loud bird flies high warm bread smells good dark forest path long road ahead
    white snow covers
    """
)
_REVERSE_TEMPLATES = (
    "Reverse the word order: {s}",
    "Write these words in reverse order: {s}",
    'Reverse the order of the words in "{s}".',
    "Put the words of this phrase in reverse order: {s}",
    "Flip the word order of the following: {s}",
)


def _reverse_words(rng: random.Random) -> tuple[str, str, int]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    t = rng.randrange(len(_REVERSE_TEMPLATES))
    return _REVERSE_TEMPLATES[t].format(s=" ".join(words)), " ".join(reversed(words)), t


# --------------------------------------------------------------------------------------------
# unit_convert: decimal conversions whose answer is a plain number

# (from unit, to unit, factor). Only powers of ten: the task is knowing which factor a pair of
# units takes, not multiplying by 60 or 24, which a 135M model does not learn in minutes
# (a first version with hours, days, feet and weeks stayed near 0% on those pairs).
_CONVERSIONS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("meters", "millimeters", 1000),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("grams", "milligrams", 1000),
    ("tonnes", "kilograms", 1000),
    ("liters", "milliliters", 1000),
    ("dollars", "cents", 100),
    ("centuries", "years", 100),
    ("decades", "years", 10),
)
_UNIT_TEMPLATES = (
    "Convert {v} {src} to {dst}.",
    "How many {dst} are in {v} {src}?",
    "What is {v} {src} in {dst}?",
    "Express {v} {src} in {dst}. Give the number only.",
    "{v} {src} equals how many {dst}?",
)


def _unit_convert(rng: random.Random) -> tuple[str, str, int]:
    src, dst, factor = rng.choice(_CONVERSIONS)
    v = rng.randint(2, 99)
    t = rng.randrange(len(_UNIT_TEMPLATES))
    return _UNIT_TEMPLATES[t].format(v=v, src=src, dst=dst), str(v * factor), t


# --------------------------------------------------------------------------------------------
# spell: a common word letter by letter, joined with hyphens

_SPELL_WORDS = _words(
    """
    garden apple river window planet candle guitar winter orange pencil rabbit forest bridge
    castle dragon flower silver basket butter cookie dinner doctor engine finger hammer island
    jacket kitten ladder market monkey number pepper pillow pocket rocket saddle summer ticket
    tomato turtle valley wallet yellow zipper house chair table cloud light music paper plant
    stone train water bread green horse lemon mouse ocean piano queen smile tiger beach clock
    dream field glass heart knife money night sugar bottle camera circle school spring street
    friend family anchor animal autumn banana barrel beauty button carpet carrot cheese cherry
    copper cotton desert dollar farmer feather garlic ginger golden hunter jungle kettle
    letter lizard magnet meadow mirror needle noodle parrot pebble pirate puzzle rubber salmon
    shadow spider stream sunset tunnel velvet violin wizard wonder bird book cake door fish
    frog gold hand kite lamp leaf milk nest rain ring rose salt ship star tree wolf wind baker
    berry brick brush chalk coast crown daisy eagle fence grape honey juice lucky maple olive
    peach pearl robin shell snake storm sweet tooth whale wheat zebra candy cabin pizza
    """
)
_SPELL_TEMPLATES = (
    "Spell '{w}' letter by letter.",
    "How do you spell the word {w}? Separate the letters with hyphens.",
    "Spell out {w} one letter at a time.",
    'Write the letters of "{w}" separated by dashes.',
    "Break the word {w} into its letters.",
    "What are the letters in the word '{w}'? Join them with hyphens.",
    "Give me the spelling of {w}, letter by letter.",
)


def _spell(rng: random.Random) -> tuple[str, str, int]:
    w = rng.choice(_SPELL_WORDS)
    t = rng.randrange(len(_SPELL_TEMPLATES))
    return _SPELL_TEMPLATES[t].format(w=w), "-".join(w), t


# --------------------------------------------------------------------------------------------

_Generator = Callable[[random.Random], tuple[str, str, int]]

_GENERATORS: dict[str, _Generator] = {
    "arithmetic": _arithmetic,
    "sentiment": _sentiment,
    "json_extract": _json_extract,
    "reverse_words": _reverse_words,
    "unit_convert": _unit_convert,
    "spell": _spell,
}
TASKS: tuple[str, ...] = tuple(_GENERATORS)

TEMPLATE_COUNTS: dict[str, int] = {
    "arithmetic": len(_ARITHMETIC_TEMPLATES),
    "sentiment": len(_SENTIMENT_TEMPLATES),
    "json_extract": len(_JSON_TEMPLATES),
    "reverse_words": len(_REVERSE_TEMPLATES),
    "unit_convert": len(_UNIT_TEMPLATES),
    "spell": len(_SPELL_TEMPLATES),
}


def generate_example(task: str, rng: random.Random) -> Example:
    """Draw one example of a task.

    Args:
        task: one of `TASKS`.
        rng: the random source; the same state gives the same example.

    Returns:
        The example, with the index of the phrasing it used.
    """
    try:
        gen = _GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None
    prompt, answer, template = gen(rng)
    return Example(task, prompt, answer, template)


def make_splits(
    task: str,
    n_train: int,
    n_exemplars: int = 64,
    n_eval: int = 128,
    seed: int = 0,
    allow_fewer: bool = False,
) -> Splits:
    """Generate disjoint train / exemplar / eval splits of one task.

    Prompts are drawn from one seeded stream and de-duplicated before they are dealt out, so
    no prompt string lands in two splits. Eval is dealt first and exemplars second, so growing
    `n_train` never changes the held-out sets.

    Args:
        task: one of `TASKS`.
        n_train: number of training examples.
        n_exemplars: number of router exemplars.
        n_eval: number of held-out evaluation examples.
        seed: seed of the stream; the task name is mixed in so tasks draw independently.
        allow_fewer: when the task runs out of distinct prompts, return a shorter train split
            instead of raising (the held-out splits are always complete).

    Returns:
        The three splits.

    Raises:
        ValueError: the task cannot produce that many distinct prompts.
    """
    rng = random.Random(f"{task}:{seed}")
    wanted = n_eval + n_exemplars + n_train
    seen: set[str] = set()
    drawn: list[Example] = []
    misses = 0
    while len(drawn) < wanted:
        ex = generate_example(task, rng)
        if ex.prompt in seen:
            misses += 1
            if misses > 20 * wanted:  # the task's space of prompts is exhausted
                if allow_fewer and len(drawn) >= n_eval + n_exemplars:
                    break
                raise ValueError(f"{task!r} cannot produce {wanted} distinct prompts")
            continue
        seen.add(ex.prompt)
        drawn.append(ex)
    return Splits(
        train=drawn[n_eval + n_exemplars :],
        exemplars=drawn[n_eval : n_eval + n_exemplars],
        eval=drawn[:n_eval],
    )


def answers_match(task: str, predicted: str, expected: str) -> bool:
    """Exact-match scoring of one answer.

    Whitespace around the answer is ignored; for `json_extract` both sides are parsed, so key
    order and spacing inside the object do not matter, but every value must be equal.

    Args:
        task: the task the answer belongs to.
        predicted: the model's text.
        expected: the reference answer.

    Returns:
        Whether the answer counts as correct.
    """
    predicted, expected = predicted.strip(), expected.strip()
    if task == "json_extract":
        try:
            return json.loads(predicted) == json.loads(expected)
        except json.JSONDecodeError:
            return False
    return predicted == expected
