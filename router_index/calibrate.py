"""`dynamerge calibrate`: choose the router's temperature and fallback threshold on held-out data.

Data. In-domain queries are the adapters' own exemplars, cross-fitted: the exemplars are dealt
into `folds` folds (exemplar j of a task goes to fold j mod folds), and each fold is scored
against an index built from the other folds only, so no query is ever scored against itself.
The tasks' `eval.jsonl` prompts are never read: they are what the quality benchmark reports.
Out-of-domain queries are general chat prompts that belong to no task
(`router_index/ood_prompts.jsonl`, about a hundred), scored against the same fold indexes.

Choices.
- Temperature: the grid value with the lowest negative log-likelihood of the true task under
  `alpha_hat` (temperature scaling, Guo et al. 2017). Top-1 accuracy does not depend on tau
  (sharpening is monotonic); tau only decides how much weight the right expert gets.
- Fallback: each rule of router_index.fallback (centroid threshold, nearest-exemplar
  threshold, a learned logistic rule) is placed the same way: at most `max_false_fallback` of
  the in-domain queries may fall back (none by default: a false fallback loses an answer the
  expert would have got right, while a missed OOD prompt only gets a lightly blended model);
  within that bound, the cut that sends the most OOD queries to the base model, in the middle
  of the gap between the scores on either side of it (the widest margin). The rule with the
  most OOD fallbacks is chosen; ties go to the simpler rule.

File format (JSON; `Settings.calibration_file` / `DYNAMERGE_CALIBRATION_FILE`): the server
takes `temperature`, `threshold`, `fallback`, `fallback_weights`, `sharpening`, and `top_k`
unless it is null; the other keys document how they were chosen. `fingerprint` identifies the
store, embedder and OOD prompts it was computed on, so a cached calibration is reused only
for the very same inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from router_index.fallback import FallbackRow, learned_rule, place_threshold, rule_row
from router_index.index import TaskIndex
from router_index.router import (
    FALLBACK_RULES,
    Fallback,
    RoutingOptions,
    Scoring,
    Sharpening,
    fallback_features,
    should_fall_back,
)

OOD_PROMPTS = Path(__file__).resolve().parent / "ood_prompts.jsonl"
# Two-stage sharpening acts on softmax(s), whose entries differ by a few hundredths, so it
# needs a much smaller tau than the single-stage softmax(s / tau) for the same sharpness.
TEMPERATURE_GRIDS: dict[str, tuple[float, ...]] = {
    # softmax(s) spreads over N tasks (entries ~1/N), so a large store needs a tau near 1/N:
    # at 1,000 tasks tau = 0.001 still left the best task 0.002 of the weight.
    "two_stage": (1e-6, 1e-5, 5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                  0.1),
    "single_stage": (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
}
THRESHOLD_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
_NLL_TIE = 1e-3  # NLL differences below this are ties, resolved towards the softer tau


@dataclass(frozen=True)
class TemperatureRow:
    temperature: float
    top1_accuracy: float  # share of in-domain queries whose best task is the true one
    true_weight: float  # mean alpha_hat of the true task
    nll: float  # mean -log alpha_hat of the true task, in nats


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    fallback_rate: float  # in-domain queries that fall back (false fallbacks)
    routing_accuracy: float  # in-domain queries routed (no fallback) to the true task first
    ood_fallback_rate: float  # OOD queries that fall back (the wanted outcome)


@dataclass(frozen=True)
class Calibration:
    """What `dynamerge calibrate` writes and the server reads."""

    temperature: float
    threshold: float
    top_k: int | None  # None: keep the server's top_k
    sharpening: Sharpening
    chosen_at: str  # ISO 8601 date-time (UTC)
    routing_accuracy: float  # in-domain, at the chosen threshold (see ThresholdRow)
    fallback_rate: float  # in-domain false fallbacks at the chosen threshold
    ood_fallback_rate: float = float("nan")
    scoring: Scoring = "centroid"
    fallback: Fallback = "centroid"  # the chosen rule
    fallback_weights: tuple[float, float, float, float] | None = None  # the learned rule's
    fingerprint: str = ""  # of the inputs (store exemplars, embedder, OOD prompts)
    data: dict[str, object] = field(default_factory=dict)  # what the choice was made on
    temperatures: tuple[TemperatureRow, ...] = ()
    thresholds: tuple[ThresholdRow, ...] = ()  # the centroid rule at several thresholds
    rules: tuple[FallbackRow, ...] = ()  # every rule, each placed by the same criterion

    def apply(self, options: RoutingOptions) -> RoutingOptions:
        """`options` with the calibrated values (what the engine's defaults become)."""
        top_k = self.top_k if self.top_k is not None else options.top_k
        return replace(
            options, temperature=self.temperature, threshold=self.threshold,
            sharpening=self.sharpening, top_k=top_k, fallback=self.fallback,
            fallback_weights=self.fallback_weights,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file, validating the values the server uses.

    Args:
        path: a JSON file written by `write_calibration` (extra keys are ignored).

    Returns:
        The calibration.

    Raises:
        ValueError: naming the file and the bad key.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        calibration = Calibration(
            temperature=float(raw["temperature"]),
            threshold=float(raw["threshold"]),
            top_k=None if raw.get("top_k") is None else int(raw["top_k"]),
            sharpening=raw.get("sharpening", "two_stage"),
            chosen_at=str(raw.get("chosen_at", "")),
            routing_accuracy=float(raw.get("routing_accuracy", float("nan"))),
            fallback_rate=float(raw.get("fallback_rate", float("nan"))),
            ood_fallback_rate=float(raw.get("ood_fallback_rate", float("nan"))),
            scoring=raw.get("scoring", "centroid"),
            fallback=raw.get("fallback", "centroid"),
            fallback_weights=None if raw.get("fallback_weights") is None
            else tuple(float(w) for w in raw["fallback_weights"]),
            fingerprint=str(raw.get("fingerprint", "")),
            data=dict(raw.get("data", {})),
            temperatures=tuple(TemperatureRow(**r) for r in raw.get("temperatures", ())),
            thresholds=tuple(ThresholdRow(**r) for r in raw.get("thresholds", ())),
            rules=tuple(FallbackRow(**r) for r in raw.get("rules", ())),
        )
        # RoutingOptions validates the ranges exactly as a request's overrides are validated.
        calibration.apply(RoutingOptions())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid calibration file ({exc})") from exc
    if calibration.sharpening not in TEMPERATURE_GRIDS:
        raise ValueError(f"{path}: sharpening must be one of {', '.join(TEMPERATURE_GRIDS)}")
    return calibration


def write_calibration(calibration: Calibration, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(calibration.to_json(), encoding="utf-8")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file of {"text": ...} (or {"prompt": ...}) objects."""
    rows = [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line]
    return [str(r["text"] if "text" in r else r["prompt"]) for r in rows]


# --- scores on held-out queries ------------------------------------------------------------
@dataclass(frozen=True)
class HeldOutScores:
    task_ids: tuple[str, ...]
    scores: np.ndarray  # [Q, N] in-domain query scores against indexes without them
    truth: np.ndarray  # [Q] int: row of the true task of each query
    ood_scores: np.ndarray  # [O * folds, N] OOD query scores against every fold index
    nearest: np.ndarray | None = None  # [Q] cosine of the best task's nearest exemplar
    ood_nearest: np.ndarray | None = None  # [O * folds] the same for the OOD queries

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """The fallback rules' features of in-domain and OOD queries ([Q, 3], [O, 3])."""
        inside = self.nearest if self.nearest is not None else np.ones(len(self.scores))
        outside = self.ood_nearest if self.ood_nearest is not None \
            else np.ones(len(self.ood_scores))
        return (fallback_features(self.scores, inside),
                fallback_features(self.ood_scores, outside))


def held_out_scores(
    tasks: Mapping[str, np.ndarray],
    ood: np.ndarray,
    folds: int = 4,
    scoring: Scoring = "centroid",
    knn_m: int = 10,
) -> HeldOutScores:
    """Cross-fitted scores of every exemplar and of the OOD queries, with the cosine of each
    query's nearest exemplar in its best task.

    Args:
        tasks: `{task id: [M_i, dim] unit exemplar embeddings}`; every task needs >= `folds`.
        ood: [O, dim] unit embeddings of out-of-domain prompts.
        folds: number of folds; each fold is scored against an index of the others.
        scoring: "centroid" (Eq. 5) or "knn", as the server scores.
        knn_m: exemplars considered by knn scoring.

    Returns:
        The scores, the true task of every in-domain query, and the OOD scores.
    """
    if folds < 2:
        raise ValueError("folds must be >= 2")
    task_ids = tuple(tasks)
    short = [t for t in task_ids if len(tasks[t]) < folds]
    if short:
        raise ValueError(f"tasks with fewer exemplars than folds ({folds}): {', '.join(short)}")
    vectors = {t: np.asarray(tasks[t], dtype=np.float32) for t in task_ids}
    ood = np.asarray(ood, dtype=np.float32).reshape(-1, next(iter(vectors.values())).shape[1])
    scores, truth, nearest, ood_scores, ood_nearest = [], [], [], [], []
    for fold in range(folds):
        held_in = {t: v[np.arange(len(v)) % folds != fold] for t, v in vectors.items()}
        queries = [v[np.arange(len(v)) % folds == fold] for v in vectors.values()]
        q = np.concatenate(queries)
        truth.extend(row for row, part in enumerate(queries) for _ in range(len(part)))
        for block, sink, near in ((q, scores, nearest), (ood, ood_scores, ood_nearest)):
            s = _fold_scores(held_in, block, scoring, knn_m)
            sink.append(s)
            near.append(_nearest_in_best(held_in, task_ids, block, s))
    n = len(task_ids)
    return HeldOutScores(
        task_ids=task_ids,
        scores=np.concatenate(scores).astype(np.float64).reshape(-1, n),
        truth=np.asarray(truth, dtype=np.int64),
        ood_scores=np.concatenate(ood_scores).astype(np.float64).reshape(-1, n),
        nearest=np.concatenate(nearest).astype(np.float64),
        ood_nearest=np.concatenate(ood_nearest).astype(np.float64),
    )


def _fold_scores(held_in: Mapping[str, np.ndarray], queries: np.ndarray, scoring: Scoring,
                 knn_m: int) -> np.ndarray:
    """[Q, N] scores of `queries` against an index of `held_in`: Eq. 5 as one matrix
    product for centroid scoring, the index's own search for knn."""
    if scoring == "centroid":
        centroids = np.stack([v.mean(axis=0) for v in held_in.values()])
        return queries @ centroids.T
    index = TaskIndex.build({t: (tuple(str(j) for j in range(len(v))), v)
                             for t, v in held_in.items()})
    return np.stack([index.knn_scores(query, knn_m) for query in queries]) if len(queries) \
        else np.zeros((0, len(held_in)), dtype=np.float32)


def _nearest_in_best(held_in: Mapping[str, np.ndarray], task_ids: tuple[str, ...],
                     queries: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[Q] cosine of each query's nearest held-in exemplar of its best-scoring task."""
    out = np.zeros(len(queries))
    if len(queries) == 0:
        return out
    best = scores.argmax(axis=1)
    for row in np.unique(best):
        chosen = best == row
        out[chosen] = (queries[chosen] @ held_in[task_ids[row]].T).max(axis=1)
    return out


# --- the choices ---------------------------------------------------------------------------
def _sharpen_rows(scores: np.ndarray, temperature: float, sharpening: Sharpening) -> np.ndarray:
    """`router.sharpen` applied to every row of [Q, N] at once."""

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    if sharpening == "two_stage":
        return softmax(softmax(scores) / temperature)
    return softmax(scores / temperature)


def temperature_table(
    held: HeldOutScores, temperatures: Sequence[float], sharpening: Sharpening
) -> list[TemperatureRow]:
    """Top-1 accuracy, mean weight on the true task and NLL for each temperature."""
    rows = []
    top1 = float(np.mean(held.scores.argmax(axis=1) == held.truth))
    for tau in temperatures:
        weights = _sharpen_rows(held.scores, tau, sharpening)
        true_w = weights[np.arange(len(held.truth)), held.truth]
        nll = float(np.mean(-np.log(np.maximum(true_w, 1e-300))))
        rows.append(TemperatureRow(float(tau), top1, float(true_w.mean()), nll))
    return rows


def choose_temperature(rows: Sequence[TemperatureRow]) -> float:
    """Lowest NLL; near-ties go to the larger (softer) temperature."""
    best = min(r.nll for r in rows)
    return max(r.temperature for r in rows if r.nll <= best + _NLL_TIE)


def threshold_row(held: HeldOutScores, threshold: float) -> ThresholdRow:
    top = held.scores.max(axis=1)
    routed = top >= threshold  # the server falls back when the best score is below
    correct = routed & (held.scores.argmax(axis=1) == held.truth)
    ood_top = held.ood_scores.max(axis=1)
    return ThresholdRow(
        threshold=float(threshold),
        fallback_rate=float(np.mean(~routed)),
        routing_accuracy=float(np.mean(correct)),
        ood_fallback_rate=float(np.mean(ood_top < threshold)) if len(ood_top) else math.nan,
    )


def fallback_rules(
    held: HeldOutScores, max_false_fallback: float
) -> tuple[list[FallbackRow], dict[str, RoutingOptions]]:
    """Every fallback rule placed by the same criterion, its table row and its options.

    Cuts are rounded down to 1e-4, so the false-fallback bound still holds.
    """
    inside, outside = held.features()
    correct = held.scores.argmax(axis=1) == held.truth
    rules: dict[str, RoutingOptions] = {}
    for rule, column in (("centroid", 0), ("nearest", 2)):
        if rule == "nearest" and held.nearest is None:
            continue
        cut = place_threshold(inside[:, column], outside[:, column], max_false_fallback)
        cut = math.floor(float(np.clip(cut, -1.0, 1.0)) * 1e4) / 1e4
        rules[rule] = RoutingOptions(fallback=rule, threshold=cut)  # type: ignore[arg-type]
    if held.nearest is not None:
        weights = learned_rule(inside, outside, max_false_fallback)
        rules["learned"] = RoutingOptions(fallback="learned", fallback_weights=weights,
                                          threshold=rules["centroid"].threshold)
    rows = []
    for rule, options in rules.items():
        parameters = (f"threshold {options.threshold:.4f}" if rule != "learned" else
                      "w = " + ", ".join(f"{w:+.2f}" for w in options.fallback_weights or ()))
        rows.append(rule_row(rule, parameters, should_fall_back(inside, options), correct,
                             should_fall_back(outside, options)))
    return rows, rules


def choose_rule(rows: Sequence[FallbackRow]) -> str:
    """The most OOD fallbacks; ties (within one prompt in a thousand) go to the simpler rule."""
    best = max(r.ood_fallback_rate for r in rows)
    order = {rule: i for i, rule in enumerate(FALLBACK_RULES)}
    return min((r.rule for r in rows if r.ood_fallback_rate >= best - 1e-3), key=order.__getitem__)


def calibrate(
    exemplars: Mapping[str, np.ndarray],
    ood: np.ndarray,
    *,
    sharpening: Sharpening = "two_stage",
    scoring: Scoring = "centroid",
    knn_m: int = 10,
    folds: int = 4,
    temperatures: Sequence[float] | None = None,
    max_false_fallback: float = 0.0,
    top_k: int | None = None,
    fallback: Fallback | None = None,
    fingerprint: str = "",
) -> Calibration:
    """Choose temperature and fallback rule from embeddings (see the module docstring).

    Args:
        exemplars: `{task id: [M_i, dim] unit exemplar embeddings}`.
        ood: [O, dim] unit embeddings of out-of-domain prompts.
        sharpening: the sharpening the server uses; the temperature is chosen for it.
        scoring: the scoring the server uses.
        knn_m: exemplars considered by knn scoring.
        folds: cross-fitting folds of the exemplars.
        temperatures: the grid; `TEMPERATURE_GRIDS[sharpening]` when None.
        max_false_fallback: share of in-domain queries allowed to fall back.
        top_k: written as is (None keeps the server's).
        fallback: force this rule; None: the best one (`choose_rule`).
        fingerprint: identifies the inputs (`fingerprint`), written into the file.

    Returns:
        The calibration, with its tables.
    """
    if not 0.0 <= max_false_fallback < 1.0:
        raise ValueError("max_false_fallback must be in [0, 1)")
    held = held_out_scores(exemplars, ood, folds, scoring, knn_m)
    grid = tuple(temperatures) if temperatures else TEMPERATURE_GRIDS[sharpening]
    tau_rows = temperature_table(held, grid, sharpening)
    tau = choose_temperature(tau_rows)
    rule_rows, rules = fallback_rules(held, max_false_fallback)
    rule = choose_rule(rule_rows) if fallback is None else fallback
    chosen = next(r for r in rule_rows if r.rule == rule)
    threshold = rules[rule].threshold
    grid_rows = sorted({rules["centroid"].threshold, *THRESHOLD_GRID})
    return Calibration(
        temperature=tau,
        threshold=threshold,
        top_k=top_k,
        sharpening=sharpening,
        chosen_at=datetime.now(UTC).isoformat(timespec="seconds"),
        routing_accuracy=chosen.routing_accuracy,
        fallback_rate=chosen.fallback_rate,
        ood_fallback_rate=chosen.ood_fallback_rate,
        scoring=scoring,
        fallback=rule,  # type: ignore[arg-type]
        fallback_weights=rules[rule].fallback_weights,
        fingerprint=fingerprint,
        data={
            "in_domain": f"adapters' exemplars, {folds}-fold cross-fitted "
            f"({len(held.truth)} queries over {len(held.task_ids)} tasks)",
            "out_of_domain": f"{len(ood)} general chat prompts",
            "max_false_fallback": max_false_fallback,
            "tasks": list(held.task_ids),
        },
        temperatures=tuple(tau_rows),
        thresholds=tuple(threshold_row(held, t) for t in grid_rows),
        rules=tuple(rule_rows),
    )


def format_tables(calibration: Calibration) -> str:
    """The tables as Markdown (temperature, fallback rules, centroid thresholds), the chosen
    rows marked."""
    lines = [
        f"Temperature ({calibration.sharpening} sharpening), on {calibration.data['in_domain']}:",
        "",
        "| tau | top-1 routing | mean weight on true task | NLL (nats) |",
        "|---:|---:|---:|---:|",
    ]
    for r in calibration.temperatures:
        mark = " **(chosen)**" if r.temperature == calibration.temperature else ""
        lines.append(
            f"| {r.temperature:g}{mark} | {100 * r.top1_accuracy:.1f}% | {r.true_weight:.4f} "
            f"| {r.nll:.4f} |"
        )
    lines += [
        "",
        f"Fallback rules, each placed for at most "
        f"{100 * float(calibration.data.get('max_false_fallback', 0)):g}% false fallbacks "
        f"(in-domain as above; OOD: {calibration.data['out_of_domain']}):",
        "",
        "| rule | parameters | in-domain fallback | routing accuracy | OOD fallback |",
        "|---|---|---:|---:|---:|",
    ]
    for r in calibration.rules:
        mark = " **(chosen)**" if r.rule == calibration.fallback else ""
        lines.append(
            f"| {r.rule}{mark} | {r.parameters} | {100 * r.fallback_rate:.1f}% "
            f"| {100 * r.routing_accuracy:.1f}% | {100 * r.ood_fallback_rate:.1f}% |"
        )
    lines += [
        "",
        "Centroid rule at other thresholds:",
        "",
        "| threshold | in-domain fallback | routing accuracy | OOD fallback |",
        "|---:|---:|---:|---:|",
    ]
    for r in calibration.thresholds:
        mark = " **(chosen)**" if (calibration.fallback == "centroid"
                                   and r.threshold == calibration.threshold) else ""
        lines.append(
            f"| {r.threshold:.4g}{mark} | {100 * r.fallback_rate:.1f}% "
            f"| {100 * r.routing_accuracy:.1f}% | {100 * r.ood_fallback_rate:.1f}% |"
        )
    return "\n".join(lines)
