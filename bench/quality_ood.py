"""Out-of-domain check: general chat prompts that belong to no task should reach the base model.

Measured on `bench/data/ood_eval.jsonl`, ~100 general chat prompts kept apart from the ~100 that
`dynamerge calibrate` sets the threshold on (`router_index/ood_prompts.jsonl`). Each prompt
is answered twice through the engine, with model "auto" and with model "base"; where routing
falls back the two answers must be identical (the fallback path is the base model, untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from bench.quality_lib import generate
from router_index.calibrate import read_prompts
from router_index.router import RoutingOptions

OOD_EVAL_PROMPTS = Path(__file__).resolve().parent / "data" / "ood_eval.jsonl"


@dataclass(frozen=True)
class OodReport:
    n_prompts: int
    fallback_rate: float  # OOD prompts that fell back (wanted)
    in_domain_fallback_rate: float  # eval prompts that fell back (unwanted)
    identical_on_fallback: tuple[int, int]  # (auto == base, fallbacks)
    identical_when_routed: tuple[int, int]  # (auto == base, OOD prompts routed to adapters)
    routed: tuple[tuple[str, str, float], ...]  # (prompt, top adapter, its score) not caught
    threshold: float
    max_tokens: int


def ood_check(
    engine: Engine,
    options: RoutingOptions,
    in_domain_fallback_rate: float,
    prompts: list[str] | None = None,
    max_tokens: int = 48,
    progress: bool = True,
) -> OodReport:
    """Fallback rate on OOD prompts, and auto-vs-base answers on them.

    Args:
        engine: a loaded engine.
        options: the routing options under test (threshold included).
        in_domain_fallback_rate: from the routing analysis of the eval prompts.
        prompts: OOD prompts; `OOD_EVAL_PROMPTS` when None.
        max_tokens: generation budget of each answer (greedy).
        progress: show progress bars.
    """
    prompts = prompts if prompts is not None else read_prompts(OOD_EVAL_PROMPTS)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = []
    for model in ("auto", "base"):
        for prompt in prompts:
            rendered = engine.render_chat([{"role": "user", "content": prompt}])
            requests.append(GenerationRequest(
                prompt=rendered, route_text=prompt, model=model,
                routing=options if model == "auto" else None, sampling=sampling,
            ))
    answers = generate(engine, requests, "OOD auto vs base", progress=progress)
    auto, base = answers[: len(prompts)], answers[len(prompts) :]
    fell = [a.fallback for a in auto]
    same = [a.text == b.text for a, b in zip(auto, base, strict=True)]
    routed = []
    for prompt, answer in zip(prompts, auto, strict=True):
        if not answer.fallback:
            decision = engine.route(prompt, options)
            top = decision.hits[0]
            routed.append((prompt, top.adapter_id, top.score))
    return OodReport(
        n_prompts=len(prompts),
        fallback_rate=sum(fell) / len(prompts) if prompts else float("nan"),
        in_domain_fallback_rate=in_domain_fallback_rate,
        identical_on_fallback=(sum(s for s, f in zip(same, fell, strict=True) if f), sum(fell)),
        identical_when_routed=(
            sum(s for s, f in zip(same, fell, strict=True) if not f), len(fell) - sum(fell)
        ),
        routed=tuple(routed),
        threshold=options.threshold,
        max_tokens=max_tokens,
    )
