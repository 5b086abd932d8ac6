"""The real demo zoo: routing accuracy on held-out prompts, and end-to-end routed answers."""

from __future__ import annotations

import json

import pytest

from adapters.registry import list_store, read_exemplars
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from app.settings import DEMO_STORE, Settings
from router_index.embedder import Embedder
from router_index.router import Router

TASKS = ["arithmetic", "json_extract", "reverse_words", "sentiment", "spell", "unit_convert"]


def _eval_pairs(task: str) -> list[dict]:
    lines = (DEMO_STORE / task / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_demo_store_holds_the_six_tasks():
    assert list_store(DEMO_STORE) == TASKS


def test_held_out_prompts_route_to_their_own_task():
    router = Router(Embedder())
    router.build({t: read_exemplars(DEMO_STORE / t / "exemplars.jsonl") for t in TASKS},
                 show_progress=False)
    correct = total = 0
    for task in TASKS:
        for pair in _eval_pairs(task):
            decision = router.route(pair["prompt"])
            correct += bool(decision.hits) and decision.hits[0].adapter_id == task
            total += 1
    accuracy = correct / total
    print(f"routing top-1 accuracy on {total} held-out prompts: {accuracy:.4f}")
    assert accuracy >= 0.98


@pytest.fixture(scope="module")
def demo_engine():
    engine = Engine(Settings())
    engine.load(show_progress=False)
    yield engine
    engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "task", "answer"),
    [
        ("What is 47 plus 38?", "arithmetic", "85"),
        ("Spell 'garden' letter by letter.", "spell", "g-a-r-d-e-n"),
        ("Reverse the word order: blue sky over hills", "reverse_words", "hills over sky blue"),
    ],
)
def test_routed_generation_on_the_demo_zoo(demo_engine, prompt, task, answer):
    request = GenerationRequest(
        prompt=demo_engine.render_chat([{"role": "user", "content": prompt}]),
        route_text=prompt,
        sampling=SamplingParams(max_tokens=24, temperature=0.0),
    )
    stream = demo_engine.submit(request)
    text, final = stream.result()
    assert stream.admission.blend[0][0] == task
    assert text.strip() == answer
    assert final.finish_reason == "stop"
