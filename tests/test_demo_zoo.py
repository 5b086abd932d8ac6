"""The real demo zoo: routing accuracy on held-out prompts, and end-to-end routed answers."""

from __future__ import annotations

import json

import pytest

from adapters.registry import list_store
from app.engine.calibration import routing_defaults, standalone_router
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from app.settings import DEMO_STORE, Settings
from router_index.calibrate import read_prompts
from router_index.router import Router

TASKS = ["arithmetic", "json_extract", "reverse_words", "sentiment", "spell", "unit_convert"]


def _pairs(task: str, held_out: str = "eval") -> list[dict]:
    lines = (DEMO_STORE / task / f"{held_out}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_demo_store_holds_the_six_tasks():
    assert list_store(DEMO_STORE) == TASKS


@pytest.fixture(scope="module")
def calibrated_router() -> Router:
    """The router the server builds on the demo zoo, with the calibration it routes by."""
    settings = Settings()
    router = standalone_router(settings)
    router.defaults = routing_defaults(settings, router)
    return router


@pytest.mark.parametrize(("held_out", "top1", "fallbacks"),
                         [("eval", 0.95, 0.03), ("paraphrases", 0.94, 0.05)])
def test_held_out_prompts_route_to_their_own_task(calibrated_router, held_out, top1, fallbacks):
    """Bounds a little under what was measured (docs/results.md has the figures), so that a
    regression of the router or of the zoo's exemplars fails here."""
    correct = fell = total = 0
    for task in TASKS:
        for pair in _pairs(task, held_out):
            decision = calibrated_router.route(pair["prompt"])
            correct += bool(decision.hits) and decision.hits[0].adapter_id == task
            fell += decision.fallback
            total += 1
    print(f"{held_out}: routing top-1 {correct / total:.4f}, fallbacks {fell / total:.4f}")
    assert correct / total >= top1
    assert fell / total <= fallbacks


def test_out_of_domain_prompts_fall_back(calibrated_router):
    prompts = read_prompts(DEMO_STORE.parent.parent.parent / "bench" / "data" / "ood_eval.jsonl")
    caught = sum(calibrated_router.route(p).fallback for p in prompts) / len(prompts)
    print(f"OOD fallback rate {caught:.3f} on {len(prompts)} held-out prompts")
    assert caught >= 0.85


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
