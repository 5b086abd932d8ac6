"""JSON mode (`response_format: {"type": "json_object"}`): constrained decoding to one object.

A character-level JSON automaton says whether text is a valid prefix of a JSON object. The
sampler asks it about its best candidates (usually the first one passes), so the cost is a
few token texts per step, not the vocabulary. Special tokens and tokens that decode to an
incomplete UTF-8 character are never allowed; once the object is closed only end-of-sequence
may follow. Whitespace between tokens is bounded, so a model cannot stall in blanks.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_WS = " \t\n\r"
_MAX_BLANKS = 8  # consecutive whitespace characters allowed outside strings
_LITERALS = ("true", "false", "null")
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"


@dataclass(frozen=True)
class _State:
    """Immutable, so a candidate token is tried on a copy for free."""

    stack: tuple[str, ...] = ()  # "o" object, "a" array
    mode: str = "start"  # start value key key_or_end colon after string number literal done
    key: bool = False  # the string being read is an object key
    escape: int = 0  # 1 after a backslash; 2..5: hex digits of \\uXXXX still to read
    number: str = ""  # number grammar state: - 0 int . frac e esign exp
    literal: str = ""  # the rest of a literal being spelled
    blanks: int = 0
    first: bool = False  # in an array or object with no element yet (a closer is allowed)


def _feed(state: _State, ch: str) -> _State | None:
    mode = state.mode
    if mode == "string":
        return _in_string(state, ch)
    if mode == "number":
        nxt = _number_step(state.number, ch)
        if nxt is not None:
            return _State(state.stack, "number", number=nxt)
        if state.number not in ("0", "int", "frac", "exp"):
            return None  # the number is not complete
        state = _State(state.stack, "after")
        mode = "after"
    if mode == "literal":
        if ch != state.literal[0]:
            return None
        rest = state.literal[1:]
        return _State(state.stack, "literal", literal=rest) if rest else _after_value(state)
    if ch in _WS:
        if mode == "done" or state.blanks >= _MAX_BLANKS:
            return None
        return _State(state.stack, mode, key=state.key, blanks=state.blanks + 1,
                      first=state.first)
    if mode == "start":
        return _State(("o",), "key_or_end", first=True) if ch == "{" else None
    if mode == "done":
        return None
    if mode in ("value", "key_or_end") and state.first and ch == ("]" if mode == "value"
                                                                 else "}"):
        return _close(state)
    if mode in ("key", "key_or_end"):
        return _State(state.stack, "string", key=True) if ch == '"' else None
    if mode == "colon":
        return _State(state.stack, "value") if ch == ":" else None
    if mode == "after":
        if ch == ",":
            return _State(state.stack, "key" if state.stack[-1] == "o" else "value")
        if ch == ("}" if state.stack[-1] == "o" else "]"):
            return _close(state)
        return None
    # mode == "value"
    if ch == '"':
        return _State(state.stack, "string")
    if ch == "{":
        return _State((*state.stack, "o"), "key_or_end", first=True)
    if ch == "[":
        return _State((*state.stack, "a"), "value", first=True)
    if ch == "-" or ch.isdigit():
        return _State(state.stack, "number", number=_number_step("", ch) or "")
    for word in _LITERALS:
        if ch == word[0]:
            return _State(state.stack, "literal", literal=word[1:])
    return None


def _in_string(state: _State, ch: str) -> _State | None:
    if state.escape == 1:
        if ch not in _ESCAPES:
            return None
        return _State(state.stack, "string", key=state.key, escape=5 if ch == "u" else 0)
    if state.escape > 1:
        if ch not in _HEX:
            return None
        return _State(state.stack, "string", key=state.key,
                      escape=state.escape - 1 if state.escape > 2 else 0)
    if ch == "\\":
        return _State(state.stack, "string", key=state.key, escape=1)
    if ch == '"':
        return _State(state.stack, "colon") if state.key else _after_value(state)
    if ord(ch) < 0x20:
        return None
    return state


def _number_step(at: str, ch: str) -> str | None:
    """The next state of JSON's number grammar, or None if `ch` cannot continue it."""
    digit = ch.isdigit() and ch.isascii()
    table = {
        "": "-" if ch == "-" else "0" if ch == "0" else "int" if digit else None,
        "-": "0" if ch == "0" else "int" if digit else None,
        "0": "." if ch == "." else "e" if ch in "eE" else None,
        "int": "int" if digit else "." if ch == "." else "e" if ch in "eE" else None,
        ".": "frac" if digit else None,
        "frac": "frac" if digit else "e" if ch in "eE" else None,
        "e": "exp" if digit else "esign" if ch in "+-" else None,
        "esign": "exp" if digit else None,
        "exp": "exp" if digit else None,
    }
    return table.get(at)


def _after_value(state: _State) -> _State:
    return _State(state.stack, "after") if state.stack else _State((), "done")


def _close(state: _State) -> _State:
    stack = state.stack[:-1]
    return _State(stack, "after") if stack else _State((), "done")


class JsonObjectConstraint:
    """`TokenConstraint` for one sequence: its output must be one JSON object.

    Args:
        texts: every token id's text, None for tokens never allowed (see `token_texts`).
    """

    def __init__(self, texts: list[str | None]) -> None:
        self.texts = texts
        self.state = _State()

    def allows(self, token_id: int) -> bool:
        return self._after(token_id) is not None

    def advance(self, token_id: int) -> None:
        after = self._after(token_id)
        if after is not None:  # end-of-sequence once complete: nothing to record
            self.state = after

    @property
    def complete(self) -> bool:
        return self.state.mode == "done"

    def _after(self, token_id: int) -> _State | None:
        text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
        if not text:
            return None
        state: _State | None = self.state
        for ch in text:
            state = _feed(state, ch)  # type: ignore[arg-type]
            if state is None:
                return None
        return state


def is_json_prefix(text: str) -> bool:
    """Whether `text` could begin a JSON object (used by tests and by JSON mode)."""
    state: _State | None = _State()
    for ch in text:
        state = _feed(state, ch)  # type: ignore[arg-type]
        if state is None:
            return False
    return True


_TEXTS: dict[int, list[str | None]] = {}


def token_texts(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str | None]:
    """Each token id's text for JSON mode, computed once per tokenizer: None for special
    tokens, ids past the tokenizer and tokens that end inside a UTF-8 character."""
    key = id(tokenizer)
    found = _TEXTS.get(key)
    if found is None:
        special = set(tokenizer.all_special_ids)
        size = len(tokenizer)
        found = []
        for token_id in range(vocab_size):
            if token_id in special or token_id >= size:
                found.append(None)
                continue
            text = tokenizer.decode([token_id])
            found.append(None if "\ufffd" in text or not text else text)
        _TEXTS[key] = found
    return found
