"""The server's routing defaults: settings, calibrated for the store at hand unless pinned.

A new user must not have to run `dynamerge calibrate`. With `calibration="auto"` (the
default) the server uses, in this order:

1. `calibration_file`, when set (a file the operator chose; it must load and validate);
2. a calibration whose fingerprint matches this store, embedder and OOD prompts: the one
   shipped inside the store (`<store>/calibration.json`, as the demo zoo has), else one cached
   under `<cache_dir>/calibration/<fingerprint>.json` by an earlier start;
3. a fresh one, cross-fitted on the index's own exemplar embeddings (nothing is embedded
   twice) and the packaged out-of-domain prompts, then cached.

Settings given explicitly (environment or code) pin their value over any calibration: a
`DYNAMERGE_THRESHOLD` set by the operator means that threshold, with the centroid rule.
`calibration="off"` uses the settings alone.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path

from app.settings import Settings
from router_index.calibrate import (
    OOD_PROMPTS,
    Calibration,
    calibrate,
    fallback_rules,
    held_out_scores,
    load_calibration,
    read_prompts,
    write_calibration,
)
from router_index.router import Router, RoutingOptions

log = logging.getLogger(__name__)
STORE_FILE = "calibration.json"  # a calibration shipped inside an adapter store
_VERSION = "3"  # bump when the procedure changes: cached results then miss
_FOLDS = 4
# In-domain exemplars allowed to fall back when a rule is placed. Zero lets the single most
# atypical exemplar decide the threshold: on the demo zoo that caught 64.5% of the OOD
# prompts (centroid rule), 1% caught 91.5% (learned rule), for 0.9% false fallbacks.
MAX_FALSE_FALLBACK = 0.01
_PINNABLE = ("top_k", "temperature", "threshold", "sharpening")


def settings_options(settings: Settings) -> RoutingOptions:
    """The routing options the settings say, before any calibration."""
    return RoutingOptions(
        top_k=settings.top_k, temperature=settings.temperature, threshold=settings.threshold,
        scoring=settings.scoring, sharpening=settings.sharpening,
        renormalize=settings.renormalize, knn_m=settings.knn_m, min_weight=settings.min_weight,
    )


def fingerprint(router: Router, settings: Settings, ood: list[str], folds: int = _FOLDS,
                max_false_fallback: float = MAX_FALSE_FALLBACK) -> str:
    """Identity of a calibration's inputs: every task's exemplars, the embedder, the OOD
    prompts and the procedure's own parameters."""
    digest = hashlib.sha256(f"{_VERSION}:{settings.scoring}:{settings.sharpening}:"
                            f"{settings.knn_m}:{folds}:{max_false_fallback:g}".encode())
    cache = router.cache
    digest.update((cache.embedder_id if cache is not None else router.embedder.name).encode())
    index = router.index
    for task in sorted(index.task_ids):
        texts, _ = index.vectors_of(task)
        digest.update(f"\x00{task}\x00".encode())
        digest.update("\x01".join(texts).encode())
    digest.update("\x02".join(ood).encode())
    return digest.hexdigest()[:24]


def routing_defaults(settings: Settings, router: Router | None = None) -> RoutingOptions:
    """The options the engine routes with when a request overrides nothing."""
    return resolve(settings, router)[0]


def resolve(settings: Settings, router: Router | None = None
            ) -> tuple[RoutingOptions, Calibration | None]:
    """The routing defaults and the calibration they come from (None: the settings')."""
    options = settings_options(settings)
    calibration = _calibration(settings, router)
    if calibration is None:
        return options, None
    calibrated = calibration.apply(options)
    pinned = {name: getattr(options, name) for name in _PINNABLE
              if name in settings.model_fields_set}
    if "threshold" in pinned:
        pinned.update(fallback="centroid", fallback_weights=None)
    if pinned:
        log.info("settings pin %s over the calibration", sorted(pinned))
        calibrated = replace(calibrated, **pinned)
    log.info("routing: tau=%g (%s), fallback rule %s, threshold %g", calibrated.temperature,
             calibrated.sharpening, calibrated.fallback, calibrated.threshold)
    return calibrated, calibration


def _calibration(settings: Settings, router: Router | None) -> Calibration | None:
    if settings.calibration_file is not None:
        return load_calibration(settings.calibration_file)
    if settings.calibration == "off" or router is None or len(router.index.task_ids) < 2:
        return None
    ood = read_prompts(OOD_PROMPTS)
    wanted = fingerprint(router, settings, ood)
    cached = settings.cache_dir / "calibration" / f"{wanted}.json"
    for path in (Path(settings.adapter_store) / STORE_FILE, cached):
        found = _matching(path, wanted)
        if found is not None:
            log.info("routing calibration read from %s", path.name)
            return found
    return _fresh(router, settings, ood, wanted, cached)


def _matching(path: Path, wanted: str) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        found = load_calibration(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring the calibration %s: %s", path, exc)
        return None
    return found if found.fingerprint == wanted else None


def _fresh(router: Router, settings: Settings, ood: list[str], wanted: str,
           cached: Path) -> Calibration | None:
    index = router.index
    exemplars = {t: index.vectors_of(t)[1] for t in index.task_ids}
    short = [t for t, v in exemplars.items() if len(v) < _FOLDS]
    if short:
        log.warning("not calibrating: tasks with fewer than %d exemplars (%s)", _FOLDS,
                    ", ".join(short[:5]))
        return None
    started = time.perf_counter()
    calibration = calibrate(
        exemplars, router.embedder.encode(ood), sharpening=settings.sharpening,
        scoring=settings.scoring, knn_m=settings.knn_m, folds=_FOLDS,
        max_false_fallback=MAX_FALSE_FALLBACK, fingerprint=wanted,
    )
    log.info("routing calibrated for this store in %.1f s (%d tasks)",
             time.perf_counter() - started, len(exemplars))
    try:
        write_calibration(calibration, cached)
    except OSError as exc:  # a read-only cache costs a recalibration next time, nothing else
        log.warning("could not cache the calibration: %s", exc)
    return calibration


def store_calibration(
    router: Router, settings: Settings, path: Path, ood_file: Path | None = None,
    folds: int = _FOLDS, max_false_fallback: float = MAX_FALSE_FALLBACK,
    top_k: int | None = None,
) -> Calibration:
    """Calibrate the store now and write it to `path` (what `dynamerge calibrate` does; a
    file shipped as `<store>/calibration.json` with the default parameters is what the
    server then uses for this store)."""
    ood = read_prompts(ood_file or OOD_PROMPTS)
    index = router.index
    calibration = calibrate(
        {t: index.vectors_of(t)[1] for t in index.task_ids}, router.embedder.encode(ood),
        sharpening=settings.sharpening, scoring=settings.scoring, knn_m=settings.knn_m,
        folds=folds, max_false_fallback=max_false_fallback, top_k=top_k,
        fingerprint=fingerprint(router, settings, ood, folds, max_false_fallback),
    )
    write_calibration(calibration, path)
    return calibration


def fallback_rule_options(router: Router, settings: Settings) -> dict[str, RoutingOptions]:
    """Every fallback rule as the calibration would place it for this store, on top of the
    router's own defaults (the quality benchmark compares them on prompts calibration never
    saw)."""
    index = router.index
    held = held_out_scores({t: index.vectors_of(t)[1] for t in index.task_ids},
                           router.embedder.encode(read_prompts(OOD_PROMPTS)), _FOLDS,
                           settings.scoring, settings.knn_m)
    _, rules = fallback_rules(held, MAX_FALSE_FALLBACK)
    return {rule: replace(router.defaults, fallback=o.fallback, threshold=o.threshold,
                          fallback_weights=o.fallback_weights) for rule, o in rules.items()}


def standalone_router(settings: Settings) -> Router:
    """The router the engine would build on this store, without loading a model (for
    `dynamerge calibrate`): same exemplars, same embedder, same embedding cache."""
    from adapters.registry import list_store, read_exemplars, resolve_adapter_dir
    from router_index.embedder import Embedder
    from router_index.embedding_cache import EmbeddingCache, embedder_identity

    embedder = Embedder(settings.embedder_path)
    cache = EmbeddingCache(settings.cache_dir / "embeddings", embedder_identity(
        embedder.path, embedder.name, embedder.dim)) if settings.embedding_cache else None
    router = Router(embedder, settings_options(settings), cache)
    store = Path(settings.adapter_store)
    ids = settings.adapters if settings.adapters is not None else list_store(store)
    tasks = {a: read_exemplars(resolve_adapter_dir(store, a) / "exemplars.jsonl") for a in ids}
    router.build({a: t for a, t in tasks.items() if t}, show_progress=False)
    return router
