"""`dynamerge calibrate`: choose the router's temperature and fallback threshold on held-out data.

Data. In-domain queries are the adapters' own exemplars, cross-fitted: the exemplars are dealt
into `folds` folds (exemplar j of a task goes to fold j mod folds), and each fold is scored
against an index built from the other folds only, so no query is ever scored against itself.
The tasks' `eval.jsonl` prompts are never read: they are what the quality benchmark reports.
Out-of-domain queries are general chat prompts that belong to no task
(`router_index/ood_prompts.jsonl`, 40 prompts), scored against the same fold indexes.

Choices.
- Temperature: the grid value with the lowest negative log-likelihood of the true task under
  `alpha_hat` (temperature scaling, Guo et al. 2017). Top-1 accuracy does not depend on tau
  (sharpening is monotonic); tau only decides how much weight the right expert gets.
- Threshold: at most `max_false_fallback` of the in-domain queries may fall back (none by
  default: a false fallback loses an answer the expert would have got right, while a missed
  OOD prompt only gets a lightly blended model); within that bound, the threshold that sends
  the most OOD queries to the base model, placed in the middle of the gap between the scores
  on either side of it (the widest margin).

File format (JSON; `Settings.calibration_file` / `DYNAMERGE_CALIBRATION_FILE`): the server
takes `temperature`, `threshold`, `sharpening`, and `top_k` unless it is null; the other keys
document how they were chosen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from router_index.index import TaskIndex
from router_index.router import RoutingOptions, Scoring, Sharpening, sharpen

if TYPE_CHECKING:
    from router_index.embedder import Embedder

OOD_PROMPTS = Path(__file__).resolve().parent / "ood_prompts.jsonl"
# Two-stage sharpening acts on softmax(s), whose entries differ by a few hundredths, so it
# needs a much smaller tau than the single-stage softmax(s / tau) for the same sharpness.
TEMPERATURE_GRIDS: dict[str, tuple[float, ...]] = {
    "two_stage": (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
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
    data: dict[str, object] = field(default_factory=dict)  # what the choice was made on
    temperatures: tuple[TemperatureRow, ...] = ()
    thresholds: tuple[ThresholdRow, ...] = ()

    def apply(self, options: RoutingOptions) -> RoutingOptions:
        """`options` with the calibrated values (what the engine's defaults become)."""
        top_k = self.top_k if self.top_k is not None else options.top_k
        return replace(
            options, temperature=self.temperature, threshold=self.threshold,
            sharpening=self.sharpening, top_k=top_k,
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
            data=dict(raw.get("data", {})),
            temperatures=tuple(TemperatureRow(**r) for r in raw.get("temperatures", ())),
            thresholds=tuple(ThresholdRow(**r) for r in raw.get("thresholds", ())),
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


def held_out_scores(
    tasks: Mapping[str, np.ndarray],
    ood: np.ndarray,
    folds: int = 4,
    scoring: Scoring = "centroid",
    knn_m: int = 10,
) -> HeldOutScores:
    """Cross-fitted Eq. 5 scores of every exemplar, and of the OOD queries.

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
    scores, truth, ood_scores = [], [], []
    for fold in range(folds):
        kept = {}
        for t in task_ids:
            vectors = np.asarray(tasks[t], dtype=np.float32)
            in_fold = np.arange(len(vectors)) % folds == fold
            kept[t] = (tuple(str(j) for j in np.flatnonzero(~in_fold)), vectors[~in_fold])
        index = TaskIndex.build(kept)
        for row, t in enumerate(task_ids):
            vectors = np.asarray(tasks[t], dtype=np.float32)
            for query in vectors[np.arange(len(vectors)) % folds == fold]:
                scores.append(_score(index, query, scoring, knn_m))
                truth.append(row)
        ood_scores.extend(_score(index, q, scoring, knn_m) for q in np.asarray(ood, np.float32))
    n = len(task_ids)
    return HeldOutScores(
        task_ids=task_ids,
        scores=np.asarray(scores, dtype=np.float64).reshape(-1, n),
        truth=np.asarray(truth, dtype=np.int64),
        ood_scores=np.asarray(ood_scores, dtype=np.float64).reshape(-1, n),
    )


def _score(index: TaskIndex, query: np.ndarray, scoring: Scoring, knn_m: int) -> np.ndarray:
    if scoring == "knn":
        return index.knn_scores(query, knn_m)
    return index.centroid_scores(query)


# --- the two choices -----------------------------------------------------------------------
def temperature_table(
    held: HeldOutScores, temperatures: Sequence[float], sharpening: Sharpening
) -> list[TemperatureRow]:
    """Top-1 accuracy, mean weight on the true task and NLL for each temperature."""
    rows = []
    top1 = float(np.mean(held.scores.argmax(axis=1) == held.truth))
    for tau in temperatures:
        weights = np.stack([sharpen(s, tau, sharpening) for s in held.scores])
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


def choose_threshold(held: HeldOutScores, max_false_fallback: float) -> float:
    """The threshold that maximises OOD fallbacks with at most `max_false_fallback` in-domain.

    Args:
        held: held-out scores.
        max_false_fallback: largest share of in-domain queries allowed to fall back, in [0, 1).

    Returns:
        A threshold in the middle of the gap between the highest OOD top score below it and
        the lowest in-domain top score allowed to stay above it.
    """
    inside = np.sort(held.scores.max(axis=1))
    allowed = math.floor(max_false_fallback * len(inside))
    upper = float(inside[min(allowed, len(inside) - 1)])  # threshold <= upper keeps the bound
    ood_top = held.ood_scores.max(axis=1)
    below = ood_top[ood_top < upper]
    if len(below) == 0:
        # No OOD query can be caught within the bound: keep a margin below in-domain scores.
        return float(np.clip(upper - 0.05, -1.0, 1.0))
    return float((below.max() + upper) / 2)


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
) -> Calibration:
    """Choose temperature and threshold from embeddings (see the module docstring).

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

    Returns:
        The calibration, with both tables.
    """
    if not 0.0 <= max_false_fallback < 1.0:
        raise ValueError("max_false_fallback must be in [0, 1)")
    held = held_out_scores(exemplars, ood, folds, scoring, knn_m)
    grid = tuple(temperatures) if temperatures else TEMPERATURE_GRIDS[sharpening]
    tau_rows = temperature_table(held, grid, sharpening)
    tau = choose_temperature(tau_rows)
    # Rounded down, so the false-fallback bound still holds.
    threshold = math.floor(choose_threshold(held, max_false_fallback) * 1e4) / 1e4
    chosen = threshold_row(held, threshold)
    grid_rows = sorted({threshold, *THRESHOLD_GRID})
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
        data={
            "in_domain": f"adapters' exemplars, {folds}-fold cross-fitted "
            f"({len(held.truth)} queries over {len(held.task_ids)} tasks)",
            "out_of_domain": f"{len(ood)} general chat prompts",
            "max_false_fallback": max_false_fallback,
            "tasks": list(held.task_ids),
        },
        temperatures=tuple(tau_rows),
        thresholds=tuple(threshold_row(held, t) for t in grid_rows),
    )


def calibrate_store(
    store: Path,
    embedder: Embedder,
    ood_prompts: Sequence[str],
    adapter_ids: Sequence[str] | None = None,
    **kwargs: object,
) -> Calibration:
    """`calibrate` on the exemplars of the adapters in `store`, embedded by `embedder`.

    Args:
        store: the adapter store (one directory per adapter, each with exemplars.jsonl).
        embedder: the router's embedder.
        ood_prompts: out-of-domain prompts.
        adapter_ids: the adapters to calibrate over; every one in the store when None.
        **kwargs: passed to `calibrate`.
    """
    from adapters.registry import list_store, read_exemplars, resolve_adapter_dir

    ids = list(adapter_ids) if adapter_ids is not None else list_store(Path(store))
    exemplars = {}
    for adapter_id in ids:
        texts = read_exemplars(resolve_adapter_dir(Path(store), adapter_id) / "exemplars.jsonl")
        if texts:
            exemplars[adapter_id] = embedder.encode(list(texts))
    if not exemplars:
        raise ValueError(f"no adapter with exemplars in {store}")
    return calibrate(exemplars, embedder.encode(list(ood_prompts)), **kwargs)  # type: ignore[arg-type]


def format_tables(calibration: Calibration) -> str:
    """The two tables as Markdown, the chosen rows marked."""
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
        f"Fallback threshold (in-domain as above; OOD: {calibration.data['out_of_domain']}):",
        "",
        "| threshold | in-domain fallback | routing accuracy | OOD fallback |",
        "|---:|---:|---:|---:|",
    ]
    for r in calibration.thresholds:
        mark = " **(chosen)**" if r.threshold == calibration.threshold else ""
        lines.append(
            f"| {r.threshold:.4g}{mark} | {100 * r.fallback_rate:.1f}% "
            f"| {100 * r.routing_accuracy:.1f}% | {100 * r.ood_fallback_rate:.1f}% |"
        )
    return "\n".join(lines)
