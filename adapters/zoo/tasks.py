"""Seeded generators for the six demo tasks of the embedded zoo.

Every task draws its prompts from many phrasings (templates: imperative, question, polite,
terse, word problems, with and without quotes) and restyles the instruction the way people
type it (all lowercase, an ALL CAPS instruction, no final punctuation, a greeting before it or
a thank-you after it), so that neither an expert nor the router can latch onto one surface
form. Generation is deterministic per seed, and the train / exemplar / eval splits never share
a prompt string. None of them holds a prompt of the hand-written paraphrase sets
(`demo/<task>/paraphrases.jsonl`): those measure how the experts do on phrasings nobody
generated, so they are kept out of every split (compared after `normalise_prompt`).

Answers have one canonical form per task; `answers_match` states what else counts as equal.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path

__all__ = [
    "PARAPHRASES_FILE",
    "TASKS",
    "TEMPLATE_COUNTS",
    "UNIT_NAMES",
    "UNIT_PAIRS",
    "UNIT_WORDS",
    "Example",
    "Splits",
    "answers_match",
    "format_number",
    "generate_example",
    "make_splits",
    "normalise_prompt",
    "parse_number",
    "reserved_prompts",
]

_DEMO_DIR = Path(__file__).resolve().parent / "demo"
PARAPHRASES_FILE = "paraphrases.jsonl"


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt with its exact expected answer."""

    task: str
    prompt: str
    answer: str
    template: int  # index into the task's phrasings, so tests can check every one is used
    category: str = ""  # sub-category for breakdowns, e.g. "add 3-digit", "time down"


@dataclass(frozen=True, slots=True)
class Splits:
    """Disjoint splits of one task (no prompt string appears in two of them)."""

    train: list[Example]
    exemplars: list[Example]  # texts the router embeds for this task
    eval: list[Example]  # held out, scored by exact match


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# --------------------------------------------------------------------------------------------
# surface variation shared by every task

_PREFIXES = (
    "Hi!", "Hello.", "Hey,", "Quick question:", "Please help me.", "I have a question.",
    "Can you help?", "Good morning!", "Homework help:", "One more:", "Hi there,", "Okay.",
)
_SUFFIXES = (
    "Thanks!", "Thank you.", "Thanks a lot.", "Please answer briefly.", "Only the answer, please.",
    "Cheers.", "Be quick.", "Just give me the answer.",
)
_FIELD = re.compile(r"(\{[a-z_]+\})")


def _restyle(rng: random.Random, template: str) -> str:
    """The template with its literal text (never its fields) restyled as people type.

    Fields such as `{word}` keep their case, so a payload (a word to spell, a name) is never
    changed, only the instruction around it.
    """

    def literal(fn: Callable[[str], str]) -> str:
        return "".join(p if _FIELD.fullmatch(p) else fn(p) for p in _FIELD.split(template))

    roll = rng.random()
    if roll < 0.15:
        template = literal(str.lower)
    elif roll < 0.20:
        template = literal(str.upper)
    if rng.random() < 0.15:
        template = f"{rng.choice(_PREFIXES)} {template}"
    # A thank-you after a trailing field would read as part of the payload (words to reverse).
    ends_in_text = template[-1:] in ".?!"
    if ends_in_text and rng.random() < 0.12:
        template = f"{template} {rng.choice(_SUFFIXES)}"
    elif ends_in_text and rng.random() < 0.15:
        template = template[:-1]
    return template


# --------------------------------------------------------------------------------------------
# numbers: one canonical form, compared by value


def format_number(value: Decimal | int) -> str:
    """The canonical form of a number answer: plain digits, a point only when needed.

    No thousands separators, no trailing zeros, no exponent: 2000, 2.5, 0.75.
    """
    d = Decimal(value)
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\.\d+")


def parse_number(text: str) -> Decimal | None:
    """The number a whole answer states, or None when it is not exactly one number.

    Accepts thousands separators ("1,000") and any trailing zeros ("1000.0"); a trailing period
    ("85.") is tolerated, units or words are not.
    """
    text = text.strip()
    if text.endswith(".") and text[:-1].strip():
        text = text[:-1]
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        return None


# --------------------------------------------------------------------------------------------
# arithmetic: addition and subtraction of one- to three-digit numbers (never negative), and
# multiplication of a number up to 99 by one digit (2-9) or within the times tables to 12 x 12

_THINGS = _words("apples coins books stickers marbles pencils cookies stamps cards shells "
                 "tickets boxes bottles chairs flowers candles balloons bricks")
_ADD_TEMPLATES = (
    "What is {a} plus {b}?",
    "What's {a} + {b}?",
    "{a} + {b} = ?",
    "{a} plus {b}",
    "Add {a} and {b}.",
    "Add {b} to {a}.",
    "Calculate {a} + {b}.",
    "Compute the sum of {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "How much is {a} plus {b}?",
    "What do {a} and {b} add up to?",
    "Find the total of {a} and {b}.",
    "What is {b} added to {a}?",
    "Work out {a} + {b} for me.",
    "Please tell me {a} plus {b}.",
    "Can you add up {a} and {b}?",
    "{a} and {b} together make what?",
    "If I have {a} {things} and buy {b} more, how many {things} do I have?",
    "A shop sold {a} {things} in the morning and {b} in the afternoon. How many did it sell "
    "in total?",
    "Tom has {a} {things} and Sara has {b}. How many {things} do they have together?",
)
_SUB_TEMPLATES = (
    "What is {a} minus {b}?",
    "What's {a} - {b}?",
    "{a} - {b} = ?",
    "{a} minus {b}",
    "Subtract {b} from {a}.",
    "Calculate {a} - {b}.",
    "What is {a} take away {b}?",
    "{a} take away {b} is what?",
    "Take {b} away from {a}.",
    "What is {a} less {b}?",
    "What is the difference between {a} and {b}?",
    "How much is {a} minus {b}?",
    "Work out the difference between {a} and {b}.",
    "Deduct {b} from {a}.",
    "Please compute {a} minus {b}.",
    "How much is left if you take {b} from {a}?",
    "Start with {a} and subtract {b}. What do you get?",
    "If you have {a} {things} and give away {b}, how many are left?",
    "A box held {a} {things}; {b} were taken out. How many {things} remain?",
    "I had {a} {things} and lost {b}. How many {things} do I have now?",
)
_MUL_TEMPLATES = (
    "What is {a} times {b}?",
    "What's {a} x {b}?",
    "{a} * {b} = ?",
    "{a} times {b}",
    "Multiply {a} by {b}.",
    "Multiply {a} and {b}.",
    "What is the product of {a} and {b}?",
    "What is {a} multiplied by {b}?",
    "Calculate {a} x {b}.",
    "How much is {a} times {b}?",
    "Compute the product of {a} and {b}.",
    "{a} multiplied by {b} is?",
    "Work out {a} times {b}.",
    "Please multiply {a} by {b} for me.",
    "If each box holds {a} {things}, how many {things} are in {b} boxes?",
    "There are {b} rows of {a} chairs. How many chairs are there?",
    "{b} friends each bring {a} {things}. How many {things} is that altogether?",
)
_ARITHMETIC_TEMPLATES = _ADD_TEMPLATES + _SUB_TEMPLATES + _MUL_TEMPLATES
_OPS = ("add",) * len(_ADD_TEMPLATES) + ("sub",) * len(_SUB_TEMPLATES) + (
    "mul",) * len(_MUL_TEMPLATES)


def _operand(rng: random.Random) -> int:
    digits = rng.choices((1, 2, 3), weights=(1, 2, 3))[0]
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic(rng: random.Random) -> tuple[str, str, int, str]:
    op = rng.choices(("add", "sub", "mul"), weights=(3, 3, 2))[0]
    t = rng.choice([i for i, o in enumerate(_OPS) if o == op])
    if op == "mul":
        if rng.random() < 0.3:  # the times tables
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            category = "mul table"
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 9)
            category = f"mul {len(str(a))}-digit x 1-digit"
        if rng.random() < 0.5:
            a, b = b, a
        answer = a * b
    else:
        a, b = _operand(rng), _operand(rng)
        if op == "sub":
            a, b = max(a, b), min(a, b)
            answer = a - b
        else:
            answer = a + b
        category = f"{op} {len(str(max(a, b)))}-digit"
    prompt = _restyle(rng, _ARITHMETIC_TEMPLATES[t]).format(a=a, b=b, things=rng.choice(_THINGS))
    return prompt, str(answer), t, category


# --------------------------------------------------------------------------------------------
# sentiment: reviews of products, films, restaurants, hotels and services, built from
# sentences with cue words ("love", "terrible") and from plain facts that carry the polarity
# without any ("the lid cracked on day two")

_ITEMS = _words(
    """
    phone blender laptop jacket headphones toaster backpack lamp vacuum keyboard tent kettle
    watch camera chair mattress printer speaker charger umbrella sofa drill tablet mixer
    """
)
_FILMS = _words("movie film thriller comedy documentary sequel cartoon drama series musical")
_CUE_POSITIVE = (
    "I absolutely love this {item}.",
    "The {item} is fantastic and worth every penny.",
    "Best {item} I have bought in years.",
    "This {item} exceeded all my expectations.",
    "What a wonderful {item}, I would recommend it to anyone.",
    "Brilliant {item}, simply delightful.",
    "Five stars, the {item} is superb.",
    "Such a pleasant surprise, the {item} is excellent.",
    "Really happy with this {item}.",
    "Great {item}, no complaints at all.",
)
_CUE_NEGATIVE = (
    "I really regret buying this {item}.",
    "The {item} is terrible and a waste of money.",
    "Worst {item} I have ever had.",
    "This {item} was a huge disappointment.",
    "What an awful {item}, avoid it at all costs.",
    "Dreadful {item}, simply unbearable.",
    "One star, the {item} is useless.",
    "Sadly the {item} is cheap and poorly made.",
    "Very unhappy with this {item}.",
    "Bad {item}, I would not buy it again.",
)
# Plain facts, per domain: the polarity is in what happened, not in an adjective.
_FACTS_POSITIVE: dict[str, tuple[str, ...]] = {
    "product": (
        "It still works like new after two years of daily use.",
        "Charging takes an hour and it then runs for the whole week.",
        "It folds flat and fits in the drawer next to the cutlery.",
        "I bought a second one for my sister.",
        "Setting it up took less time than making a cup of tea.",
        "It is so quiet that the baby sleeps right through it.",
        "The replacement part arrived two days after I asked for it.",
        "Everyone who visits asks me where I got it.",
    ),
    "film": (
        "The whole cinema clapped when it ended.",
        "I have already seen it three times and noticed something new each time.",
        "Two hours went by like twenty minutes.",
        "My teenage son put his phone away for the entire film.",
        "I was still thinking about the ending the next morning.",
        "We bought the soundtrack on the way home.",
    ),
    "restaurant": (
        "The bread was still warm and the portions were generous.",
        "The chef came out to ask how we liked the fish.",
        "We were seated right away even without a booking.",
        "My plate was empty within ten minutes.",
        "They packed the leftovers for us and added two free cookies.",
        "We have been going every Friday since it opened.",
    ),
    "hotel": (
        "The bed was huge and the street noise never reached our room.",
        "Reception let us check in at ten in the morning at no cost.",
        "Breakfast had fresh fruit, warm pastries and real coffee.",
        "The view from the balcony was worth the trip alone.",
        "We extended our stay by two nights.",
    ),
    "service": (
        "The technician arrived on time and cleaned up after himself.",
        "My order came a day before the promised date.",
        "The agent solved my problem on the first call.",
        "They refunded me the same afternoon without any questions.",
        "The teacher answered every question, even the silly ones.",
        "The driver helped carry our bags all the way up to the flat.",
    ),
}
_FACTS_NEGATIVE: dict[str, tuple[str, ...]] = {
    "product": (
        "The handle came off in my hand on the third day.",
        "It needs charging twice a day.",
        "The screen went black a week after the warranty ended.",
        "Half of the screws were missing from the box.",
        "It makes a grinding noise every time I switch it on.",
        "It was back in its box and on the way to the shop within a week.",
        "The paint started peeling after the first wash.",
        "The instructions were in a language nobody in our house reads.",
    ),
    "film": (
        "I fell asleep before the first half was over.",
        "Half the audience had left before the ending.",
        "The dialogue sounded like it was written in an afternoon.",
        "Nothing happened for the first hour.",
        "I could guess every scene before it started.",
        "We asked for our money back at the ticket desk.",
    ),
    "restaurant": (
        "Our starters took an hour to arrive.",
        "The fish was cold in the middle and the rice was burnt.",
        "Nobody came to take our order until we waved twice.",
        "They charged us for drinks we never ordered.",
        "The table was sticky and the menu was torn.",
        "I was ill for two days after eating there.",
    ),
    "hotel": (
        "The shower had no hot water for our whole stay.",
        "There was someone else's hair on the pillow.",
        "The room was next to the lift and we heard it all night.",
        "The photos online must have been taken ten years ago.",
        "We found a cockroach in the bathroom on the first night.",
    ),
    "service": (
        "The engineer never turned up and nobody phoned to say why.",
        "My package was delivered to the wrong street.",
        "I have been on hold for forty minutes three days in a row.",
        "They charged my card twice and still have not refunded it.",
        "The lessons were cancelled at the last minute four times.",
        "The repair lasted exactly one week.",
    ),
}
_DOMAIN_NAMES = {
    "product": ("product", "{item}"),
    "film": ("film", "{item}"),
    "restaurant": ("restaurant", "restaurant"),
    "hotel": ("hotel", "hotel"),
    "service": ("service", "company"),
}
_SENTIMENT_TEMPLATES = (
    "Is this review positive or negative? {review}",
    "Classify the sentiment of this review as positive or negative: {review}",
    'Review: "{review}" What is the sentiment of the review?',
    "{review}\nWas this reviewer happy? Answer positive or negative.",
    "Tell me whether the following review is positive or negative.\n{review}",
    "Sentiment analysis (positive/negative): {review}",
    "{review} Positive or negative?",
    "Here is a {domain} review: \"{review}\" Is it positive or negative?",
    "What is the tone of this review, positive or negative? {review}",
    "Label the following review as positive or negative.\n{review}",
    "Would you call this review positive or negative? '{review}'",
    "Decide if this feedback is positive or negative: {review}",
    "Customer review: {review}\nSentiment?",
    "Read the review and answer positive or negative. {review}",
    "Does the reviewer like the {domain}? Answer positive or negative. {review}",
    "positive/negative? {review}",
    'Sentiment: "{review}"',
    "How does this reviewer feel, positive or negative? {review}",
    "I got this review of my {domain}: {review} Is it positive or negative?",
    "Please classify this {domain} review as positive or negative: '{review}'",
)


def _sentiment(rng: random.Random) -> tuple[str, str, int, str]:
    positive = rng.random() < 0.5
    domain = rng.choice(tuple(_DOMAIN_NAMES))
    item = rng.choice(_FILMS if domain == "film" else _ITEMS)
    noun = _DOMAIN_NAMES[domain][1].format(item=item)
    cues = _CUE_POSITIVE if positive else _CUE_NEGATIVE
    facts = (_FACTS_POSITIVE if positive else _FACTS_NEGATIVE)[domain]
    # Half the reviews carry no cue word at all: the polarity is in the facts alone.
    plain = rng.random() < 0.5
    n = rng.choice((1, 1, 2, 3))
    if plain:
        sentences = rng.sample(facts, min(n, len(facts)))
    else:
        sentences = [rng.choice(cues).format(item=noun), *rng.sample(facts, n - 1)]
        rng.shuffle(sentences)
    review = " ".join(sentences)
    t = rng.randrange(len(_SENTIMENT_TEMPLATES))
    label = "positive" if positive else "negative"
    domain_word = _DOMAIN_NAMES[domain][0] if domain != "product" else item
    prompt = _restyle(rng, _SENTIMENT_TEMPLATES[t]).format(review=review, domain=domain_word)
    return prompt, label, t, f"{label} {'plain' if plain else 'cue'}"


# --------------------------------------------------------------------------------------------
# json_extract: a person's name and age from one sentence of many shapes

_NAMES = _words(
    """
    Maria John Aiko Pedro Fatima Liam Chen Olga Kwame Sofia Ahmed Emma Raj Lucia Noah Ingrid
    Tomas Amara Yuki Diego Hannah Omar Elena Victor Priya Lars Nadia Mateo Zara Felix Grace
    Ivan Leila Oscar Mei Samuel Anya Hugo Clara Ravi Beatriz Kemal Sienna Dmitri Akosua
    Niamh Jorge Layla Finn Rosa Tunde Ewa Mohammed Ingrid Paolo Keiko Asha Bruno Dalia Wen
    Sven Imani Louis Farah Nils Camila Kai Yasmin Arthur Leah Soren Ayumi Emeka Marta Jonah
    Ruby Adil Petra Julian Nour Gabriel Astrid Kiran Selma Rohan Iris Malik Vera Ethan
    """
)
_SURNAMES = _words(
    """
    Silva Tanaka Okafor Novak Garcia Kim Jensen Rossi Mensah Kowalski Patel Dubois Larsen
    Moreno Ivanova Nakamura Haddad Fischer Costa Lindqvist Reyes Banerjee Schultz Ortega
    """
)
_CITIES = _words(
    """
    Lima Paris Tokyo Nairobi Oslo Toronto Cairo Madrid Berlin Sydney Mumbai Seoul Lisbon
    Dublin Quito Hanoi Vienna Accra Prague Denver Lagos Bogota Kyoto Porto Helsinki Austin
    """
)
_JOBS = _words("teacher nurse baker pilot chef farmer lawyer student painter engineer "
               "dentist plumber writer cashier architect gardener")
_RELATIONS = _words("aunt uncle cousin friend colleague neighbour brother sister daughter son")
_JSON_FACTS = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, works in {city}.",
    "Last year {name} moved to {city}; {name} is now {age} years old.",
    "In {city} lives {name}, who is {age}.",
    "{name} ({age}) is a {job} from {city}.",
    "Meet {name}, a {age}-year-old {job}.",
    "{name} turned {age} this year.",
    "At {age}, {name} still works as a {job}.",
    "My {relation} {name} is {age}.",
    "Name: {name}, Age: {age}",
    "{name} - {age} - {city}",
    "{name} is a {age} year old {job} in {city}.",
    "I'm {name} and I am {age} years old.",
    "Hello, my name is {name} and I'm {age}.",
    "{name} celebrated turning {age} last weekend.",
    "The {job}, {name}, is {age} years old.",
    "{name}, who is {age}, lives in {city}.",
    "{name} has lived in {city} for {years} years and is {age} now.",
    "{name} is {age}.",
    "Our new {job} is {name}, {age}, from {city}.",
)
_JSON_TEMPLATES = (
    "Extract the name and age as JSON: {fact}",
    "Return a JSON object with the keys name and age for this text: {fact}",
    "From the sentence below, give the person's name and age in JSON.\n{fact}",
    "Text: {fact}\nOutput the name and age as a JSON object.",
    "Parse the following into JSON with fields name and age: {fact}",
    "Turn this into JSON (name, age): {fact}",
    'Convert the following to a JSON object with name and age: "{fact}"',
    "What are the name and age here? Reply in JSON. {fact}",
    "JSON with name and age, please: {fact}",
    "Extract name/age to JSON from '{fact}'",
    "Read this and output JSON with the person's name and age: {fact}",
    "Text: {fact}\nTask: give name and age as JSON.",
    "{fact}\nPlease extract the name and age as JSON.",
    "Give me a JSON object holding the name and the age in: {fact}",
    "name + age as JSON: {fact}",
    'Write JSON with "name" and "age" for this person: {fact}',
    "Can you pull the name and age from this into JSON? {fact}",
    "Output JSON only (keys: name, age). {fact}",
)


def _json_extract(rng: random.Random) -> tuple[str, str, int, str]:
    name = rng.choice(_NAMES)
    full = rng.random() < 0.2
    if full:
        name = f"{name} {rng.choice(_SURNAMES)}"
    roll = rng.random()
    age = rng.randint(3, 17) if roll < 0.1 else rng.randint(90, 99) if roll < 0.15 else (
        rng.randint(18, 89))
    fact = rng.choice(_JSON_FACTS).format(
        name=name, age=age, city=rng.choice(_CITIES), job=rng.choice(_JOBS),
        relation=rng.choice(_RELATIONS), years=rng.randint(2, max(2, age // 2)),
    )
    t = rng.randrange(len(_JSON_TEMPLATES))
    prompt = _restyle(rng, _JSON_TEMPLATES[t]).format(fact=fact)
    return prompt, json.dumps({"name": name, "age": age}), t, "full name" if full else "name"


# --------------------------------------------------------------------------------------------
# reverse_words: three to six words, random or a small sentence, in reverse order

_WORDS = _words(
    """
    blue sky over hills red car fast river green tree small house cold night bright moon old
    dog runs home sun rises early quiet lake big city lights soft rain falls slowly happy
    child sings loud bird flies high warm bread smells good dark forest path long road ahead
    white snow covers garden window music table orange paper chair water friend letter
    morning evening winter summer coffee apple door street market doctor teacher ship ocean
    mountain island story song game book phone train bridge castle candle flower stone
    the the the a a is is are was in in on at at to to of and and from over after with me we
    you it my your our his her under near into before walked sang played looks needs goes
    """
)
_SUBJECTS = _words("the_dog my_sister our_team the_baby a_farmer the_wind Maria Tom she he "
                   "the_teacher my_neighbour Leo Anna")
_VERBS = _words("likes sees paints finds sells wants reads builds visits loves cleans fixes")
_OBJECTS = _words("the_car a_house old_books fresh_bread the_garden red_apples a_letter "
                  "the_bridge new_shoes the_kitchen a_song warm_soup")
_TAILS = _words("today every_day at_night in_winter on_sunday after_school slowly again")
_INTRANSITIVE = _words("walks sits waits swims sleeps plays runs looks works is was")
_PLACES = _words("to_the_park on_the_bench at_the_station in_the_lake under_the_tree "
                 "near_the_river from_the_city into_the_house over_the_wall after_lunch "
                 "before_dinner with_her_friends at_home in_the_kitchen")
_REVERSE_TEMPLATES = (
    "Reverse the word order: {s}",
    "Write these words in reverse order: {s}",
    'Reverse the order of the words in "{s}".',
    "Put the words of this phrase in reverse order: {s}",
    "Flip the word order of the following: {s}",
    "Reverse the words in '{s}'.",
    "Can you reverse the order of these words? {s}",
    "Say the words backwards: {s}",
    "Words reversed, please: {s}",
    "Write '{s}' with the words in reverse order.",
    "Reverse this phrase word by word: {s}",
    'Give the words of "{s}" from last to first.',
    "Turn the word order around: {s}",
    "Reverse: {s}",
    "Rewrite the phrase in reverse word order: {s}",
    "What is '{s}' with its words reversed?",
    "Please reverse the sequence of words: {s}",
    "Order these words back to front: {s}",
    "{s}\nReverse the order of the words above.",
    "Reverse the word order of this sentence, keep the words unchanged: {s}",
)


def _phrase(rng: random.Random) -> list[str]:
    if rng.random() < 0.4:
        return rng.choices(_WORDS, k=rng.randint(3, 6))
    # Little sentences keep their small words ("the", "is", "at"): a reversal drops none.
    if rng.random() < 0.5:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    else:
        parts = [rng.choice(_SUBJECTS), rng.choice(_INTRANSITIVE), rng.choice(_PLACES)]
    if rng.random() < 0.4:
        parts.append(rng.choice(_TAILS))
    words = " ".join(parts).replace("_", " ").split()
    return words[:6] if len(words) >= 3 else _phrase(rng)


def _reverse_words(rng: random.Random) -> tuple[str, str, int, str]:
    words = _phrase(rng)
    t = rng.randrange(len(_REVERSE_TEMPLATES))
    prompt = _restyle(rng, _REVERSE_TEMPLATES[t]).format(s=" ".join(words))
    return prompt, " ".join(reversed(words)), t, f"{len(words)} words"


# --------------------------------------------------------------------------------------------
# unit_convert: length, mass, volume, time and money, both directions

# unit -> (plural, singular, abbreviation or "", British spelling or "")
UNIT_NAMES: dict[str, tuple[str, str, str, str]] = {
    "km": ("kilometers", "kilometer", "km", "kilometres"),
    "m": ("meters", "meter", "m", "metres"),
    "cm": ("centimeters", "centimeter", "cm", "centimetres"),
    "mm": ("millimeters", "millimeter", "mm", "millimetres"),
    "ft": ("feet", "foot", "ft", ""),
    "in": ("inches", "inch", "", ""),
    "t": ("tonnes", "tonne", "", ""),
    "kg": ("kilograms", "kilogram", "kg", ""),
    "g": ("grams", "gram", "g", ""),
    "mg": ("milligrams", "milligram", "mg", ""),
    "l": ("liters", "liter", "", "litres"),
    "ml": ("milliliters", "milliliter", "ml", "millilitres"),
    "day": ("days", "day", "", ""),
    "week": ("weeks", "week", "", ""),
    "h": ("hours", "hour", "", ""),
    "min": ("minutes", "minute", "min", ""),
    "s": ("seconds", "second", "", ""),
    "century": ("centuries", "century", "", ""),
    "decade": ("decades", "decade", "", ""),
    "year": ("years", "year", "", ""),
    "dollar": ("dollars", "dollar", "", ""),
    "cent": ("cents", "cent", "", ""),
}
# every spelling a prompt may use -> the unit
UNIT_WORDS: dict[str, str] = {
    name: unit
    for unit, names in UNIT_NAMES.items()
    for name in (*names, names[3][:-1])
    if name
}
# (family, larger unit, smaller unit, how many smaller units make one larger)
UNIT_PAIRS: tuple[tuple[str, str, str, int], ...] = (
    ("length", "km", "m", 1000),
    ("length", "m", "cm", 100),
    ("length", "m", "mm", 1000),
    ("length", "cm", "mm", 10),
    ("length", "ft", "in", 12),
    ("mass", "t", "kg", 1000),
    ("mass", "kg", "g", 1000),
    ("mass", "g", "mg", 1000),
    ("volume", "l", "ml", 1000),
    ("time", "week", "day", 7),
    ("time", "day", "h", 24),
    ("time", "h", "min", 60),
    ("time", "min", "s", 60),
    ("time", "h", "s", 3600),
    ("time", "century", "year", 100),
    ("time", "decade", "year", 10),
    ("money", "dollar", "cent", 100),
)
_UNIT_TEMPLATES = (
    "Convert {v} {src} to {dst}.",
    "How many {dst} are in {v} {src}?",
    "What is {v} {src} in {dst}?",
    "Express {v} {src} in {dst}. Give the number only.",
    "{v} {src} equals how many {dst}?",
    "{v} {src} is how many {dst}?",
    "How many {dst} is {v} {src}?",
    "Change {v} {src} into {dst}.",
    "Please convert {v} {src} into {dst}.",
    "What's {v} {src} in {dst}?",
    "{v} {src} = ? {dst}",
    "I have {v} {src}. How many {dst} is that?",
    "Turn {v} {src} into {dst}.",
    "Can you convert {v} {src} to {dst} for me?",
    "{v} {src} to {dst}",
    "How much is {v} {src} in {dst}?",
    "Tell me how many {dst} make {v} {src}.",
    "Something takes up {v} {src}. What is that in {dst}?",
    "Rewrite {v} {src} in {dst}.",
    "If I have {v} {src}, how many {dst} do I have?",
)
# Fractions of a larger unit that give short decimals, for values that are not whole.
_HALVES = (Decimal("0.5"), Decimal("1.5"), Decimal("2.5"), Decimal("3.5"), Decimal("4.5"))
_QUARTERS = (Decimal("0.25"), Decimal("0.75"), Decimal("1.25"), Decimal("1.75"),
             Decimal("2.25"), Decimal("2.75"))
_TENTHS = tuple(Decimal(f"{i}.{j}") for i in range(0, 10) for j in range(1, 10))


def _unit_name(rng: random.Random, unit: str, value: Decimal) -> str:
    plural, singular, abbr, british = UNIT_NAMES[unit]
    roll = rng.random()
    if abbr and roll < 0.2:
        return abbr
    if british and roll < 0.35:
        return british if value != 1 else british[:-1]
    return singular if value == 1 else plural


def _large_value(rng: random.Random, factor: int) -> Decimal:
    """An amount of the larger unit: mostly whole, sometimes a fraction that converts cleanly."""
    roll = rng.random()
    if roll < 0.4:
        return Decimal(rng.randint(1, 12))
    if roll < 0.75:
        return Decimal(rng.randint(13, 99))
    if factor % 100 == 0 and rng.random() < 0.5:  # metric: tenths and hundredths
        return rng.choice(_TENTHS) if rng.random() < 0.6 else rng.choice(_QUARTERS)
    if factor % 4 == 0:
        return rng.choice(_QUARTERS + _HALVES)
    if factor % 2 == 0:
        return rng.choice(_HALVES)
    return Decimal(rng.randint(2, 30))


# Families drawn by weight, then a pair within the family: volume has one pair, time seven.
_FAMILY_WEIGHTS = {"length": 3, "mass": 3, "volume": 2, "time": 4, "money": 1}


def _unit_convert(rng: random.Random) -> tuple[str, str, int, str]:
    family = rng.choices(tuple(_FAMILY_WEIGHTS), weights=tuple(_FAMILY_WEIGHTS.values()))[0]
    family, large, small, factor = rng.choice([p for p in UNIT_PAIRS if p[0] == family])
    amount = _large_value(rng, factor)
    if rng.random() < 0.5:
        v, src, dst, answer, direction = amount, large, small, amount * factor, "up"
    else:
        v, src, dst, answer, direction = amount * factor, small, large, amount, "down"
    t = rng.randrange(len(_UNIT_TEMPLATES))
    prompt = _restyle(rng, _UNIT_TEMPLATES[t]).format(
        v=format_number(v), src=_unit_name(rng, src, v), dst=_unit_name(rng, dst, Decimal(2))
    )
    return prompt, format_number(answer), t, f"{family} {direction}"


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
    airport balloon bicycle blanket cabbage captain ceiling chicken climate cupboard dolphin
    factory fortune gallery harvest history holiday husband kingdom laundry machine mineral
    morning monster nothing octopus package pattern picture pilgrim popcorn problem pumpkin
    quarter rainbow science station student thunder tractor uniform village weather whisper
    absolute adventure afternoon astronaut beginning butterfly celebrate challenge chemistry
    community crocodile dangerous delicious different direction education elephant equipment
    excellent favourite furniture important invisible knowledge landscape marathon medicine
    necessary newspaper orchestra passenger pineapple president question restaurant sandwich
    scientist sometimes spaghetti strawberry telephone temperature tomorrow treasure umbrella
    universe vegetable volcano wednesday yesterday mystery journey calendar hospital
    ant bee cat cow cup egg fox hat ice ink jam key map owl pen pig sea sky toy van web yak
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
    "Spell {w}.",
    "How is {w} spelled?",
    "Can you spell '{w}' for me?",
    "spell {w}",
    "Please spell the word \"{w}\".",
    "Spell the word {w} with a hyphen between the letters.",
    "What is the spelling of '{w}'?",
    "Write {w} letter by letter.",
    "Letter by letter, spell {w}.",
    "Could you spell out the word {w}?",
    "I need the word {w} spelled out.",
    "Show me how to spell {w}.",
    "List the letters of {w} in order.",
)


def _spell(rng: random.Random) -> tuple[str, str, int, str]:
    w = rng.choice(_SPELL_WORDS)
    t = rng.randrange(len(_SPELL_TEMPLATES))
    size = "3-5" if len(w) <= 5 else "6-8" if len(w) <= 8 else "9+"
    return _restyle(rng, _SPELL_TEMPLATES[t]).format(w=w), "-".join(w), t, f"{size} letters"


# --------------------------------------------------------------------------------------------

_Generator = Callable[[random.Random], tuple[str, str, int, str]]

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
        The example, with the index of the phrasing it used and its sub-category.
    """
    try:
        gen = _GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None
    prompt, answer, template, category = gen(rng)
    return Example(task, prompt, answer, template, category)


def normalise_prompt(text: str) -> str:
    """Lowercase, whitespace collapsed, punctuation stripped at both ends."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@cache
def _reserved(demo_dir: Path) -> frozenset[str]:
    prompts = set()
    for path in sorted(demo_dir.glob(f"*/{PARAPHRASES_FILE}")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.add(normalise_prompt(json.loads(line)["prompt"]))
    return frozenset(prompts)


def reserved_prompts(demo_dir: Path = _DEMO_DIR) -> frozenset[str]:
    """Normalised prompts of every hand-written paraphrase set in `demo_dir`."""
    return _reserved(Path(demo_dir).resolve())


def make_splits(
    task: str,
    n_train: int,
    n_exemplars: int = 128,
    n_eval: int = 128,
    seed: int = 0,
    allow_fewer: bool = False,
    exclude: Collection[str] | None = None,
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
        exclude: normalised prompts (`normalise_prompt`) that no split may hold; the demo
            zoo's hand-written paraphrases (`reserved_prompts()`) when None.

    Returns:
        The three splits.

    Raises:
        ValueError: the task cannot produce that many distinct prompts.
    """
    excluded = reserved_prompts() if exclude is None else exclude
    rng = random.Random(f"{task}:{seed}")
    wanted = n_eval + n_exemplars + n_train
    seen: set[str] = set()
    drawn: list[Example] = []
    misses = 0
    while len(drawn) < wanted:
        ex = generate_example(task, rng)
        if ex.prompt in seen or normalise_prompt(ex.prompt) in excluded:
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


_NUMERIC_TASKS = frozenset({"arithmetic", "unit_convert"})


def answers_match(task: str, predicted: str, expected: str) -> bool:
    """Exact-match scoring of one answer.

    Whitespace around the answer is ignored. For `arithmetic` and `unit_convert` both sides
    are read as one number (`parse_number`) and compared by value, so "1,000", "1000" and
    "1000.0" are the same answer, but "1000 grams" or "The answer is 1000" are not. For
    `json_extract` both sides are parsed, so key order and spacing inside the object do not
    matter, but every value must be equal (an age of "34" is not 34). Everything else must be
    equal character for character.

    Args:
        task: the task the answer belongs to.
        predicted: the model's text.
        expected: the reference answer.

    Returns:
        Whether the answer counts as correct.
    """
    predicted, expected = predicted.strip(), expected.strip()
    if task in _NUMERIC_TASKS:
        got, want = parse_number(predicted), parse_number(expected)
        return got is not None and want is not None and got == want
    if task == "json_extract":
        try:
            return json.loads(predicted) == json.loads(expected)
        except json.JSONDecodeError:
            return False
    return predicted == expected
