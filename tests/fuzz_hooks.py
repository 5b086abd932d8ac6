"""Schemathesis hooks and checks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

- Generations stay short: a generated max_tokens / max_completion_tokens / n within the
  schema's range is lowered to a small cap (never moved out of its range, so a valid case stays
  valid and an invalid one invalid).
- The adapter store holds adapters that are not loaded at start (FUZZ_NEW_ADAPTERS); a
  random id is never one, so in the stateful phase half of the generated registrations name
  the next of them (each scenario starts afresh, but the server keeps what an earlier one
  registered), and the links can be followed: use it, delete it, use it again (404),
  register it again.
- Checks of our own: every 4xx is the OpenAI envelope; no body carries a stack trace or a
  server path; a deleted adapter is a 404 as a model until registered again.
- Positive-data acceptance allows the two 400s no OpenAPI schema can express, and only them:
  the prompt plus max_tokens over the model's context (a token count), and a logit_bias or
  prompt token id past the vocabulary (a model property).
"""

from __future__ import annotations

import itertools
import json
import os
import zlib

import schemathesis
from schemathesis import Case

TOKEN_CAP = int(os.environ.get("FUZZ_TOKEN_CAP", "3"))
N_CAP = 2
NEW = [a for a in os.environ.get("FUZZ_NEW_ADAPTERS", "").split(",") if a]
PRIVATE = [p for p in os.environ.get("FUZZ_PRIVATE_PATHS", "").split(os.pathsep) if p]
UNEXPRESSIBLE = {("context_length_exceeded", "max_tokens"), ("invalid_parameter", "logit_bias"),
                 ("invalid_parameter", "prompt")}

_deleted: set[str] = set()
_fresh = itertools.count()


def _number(value: object) -> float | None:
    """An integer the server reads as one (3 or 3.0), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if isinstance(value, int) or value.is_integer() else None


def _lower(body: dict, key: str, cap: int, maximum: float) -> None:
    """Lower a value within [cap, maximum] to cap: valid stays valid, invalid stays invalid."""
    value = _number(body.get(key))
    if value is not None and cap < value <= maximum:
        body[key] = cap


@schemathesis.hook
def before_call(context, case: Case, kwargs: dict) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    if case.path == "/v1/adapters" and case.method == "POST" and NEW and _stateful(case):
        ident = body.get("id")
        if isinstance(ident, str) and ident not in NEW and zlib.crc32(ident.encode()) % 2 == 0:
            body["id"] = NEW[min(next(_fresh), len(NEW) - 1)]
    if case.path in ("/v1/chat/completions", "/v1/completions", "/v1/generate"):
        maximum = _maximum(case)
        for key in ("max_tokens", "max_completion_tokens"):
            _lower(body, key, TOKEN_CAP, maximum)
        _lower(body, "n", N_CAP, _maximum(case, "n"))


def _stateful(case: Case) -> bool:
    """Only the stateful phase registers the new adapter: there its links can delete it, so
    that later scenarios can register it again (earlier phases would leave it registered)."""
    phase = case.meta.phase.name if case.meta is not None else None
    return getattr(phase, "value", phase) == "stateful"


def _maximum(case: Case, field: str = "max_tokens") -> float:
    """The schema's maximum of `field` (values above it are negative cases: left alone)."""
    schema = case.operation.schema.raw_schema
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    spec = props[field]
    return next(b["maximum"] for b in spec.get("anyOf", [spec]) if "maximum" in b)


@schemathesis.hook
def filter_failure(context, failure, case: Case, response) -> bool:
    """Keep every failure except positive-data rejections that are the unexpressible 400s."""
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return True
    return (error.get("code"), error.get("param")) not in UNEXPRESSIBLE


@schemathesis.check
def openai_error_envelope(ctx, response, case: Case) -> bool | None:
    text = response.content.decode("utf-8", "replace")
    assert "Traceback" not in text, "a stack trace in the body"
    for path in PRIVATE:
        assert path not in text, "a server path in the body"
    if 400 <= response.status_code < 500:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
    return None


@schemathesis.check
def deleted_adapter_is_gone(ctx, response, case: Case) -> bool | None:
    body = case.body if isinstance(case.body, dict) else {}
    if case.path == "/v1/adapters" and case.method == "POST" and response.status_code == 201:
        _deleted.discard(body.get("id"))
    elif case.method == "DELETE" and response.status_code == 200:
        _deleted.add(response.json()["id"])
    elif case.path == "/v1/chat/completions" and str(body.get("model")) in _deleted:
        assert response.status_code in (400, 401, 404, 422), (  # 401: the no-key probe
            f"model {body['model']!r} was deleted, yet the chat answered {response.status_code}")
    return None
