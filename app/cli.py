"""The `dynamerge` command line: serve, route, generate, and the demo zoo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Nothing is ever downloaded at run time: models come from packages and local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads sleep as soon as a parallel region ends instead of spinning for ~300k
# iterations, a few ms (libgomp's default). A spinning helper holds a core that routing, HTTP
# or the decode's own preempted thread needs: on 2 busy cores a two-thread decode step took
# 0.85-1.7 s spinning against 51-111 ms sleeping (docs/benchmarks.md, "Decode threads").
# libgomp reads it when torch loads, so it is set here, before anything imports torch.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dynamerge",
        description="Per-request dynamic LoRA merging server. Settings come from DYNAMERGE_* "
        "environment variables (see app/settings.py).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve the OpenAI-compatible API (demo zoo by default)")

    route = sub.add_parser("route", help="print the routing decision for a prompt")
    route.add_argument("text")
    _routing_flags(route)

    generate = sub.add_parser("generate", help="answer a prompt with routed, blended adapters")
    generate.add_argument("text")
    generate.add_argument("--model", default="auto", help="auto, base, or an adapter id")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    _routing_flags(generate)

    calibrate = sub.add_parser(
        "calibrate", help="choose the router's temperature and fallback threshold (held out)"
    )
    calibrate.add_argument("--out", type=Path, default=None,
                           help="JSON to write (default: DYNAMERGE_CALIBRATION_FILE, else "
                           "./calibration.json)")
    calibrate.add_argument("--ood", type=Path, default=None,
                           help="JSONL of out-of-domain prompts (default: the packaged 40)")
    calibrate.add_argument("--folds", type=int, default=4, help="cross-fitting folds")
    calibrate.add_argument("--max-false-fallback", type=float, default=0.01,
                           help="share of in-domain prompts allowed to fall back")
    calibrate.add_argument("--top-k", type=int, default=None, help="also fix top_k")

    merge = sub.add_parser("merge", help="write a static merge as a PEFT LoRA adapter")
    merge.add_argument("--adapters", required=True, help="comma-separated adapter ids")
    merge.add_argument("--weights", required=True, help="comma-separated weights")
    merge.add_argument("--method", default="ties", help="a merge method (see adapters/merge)")
    merge.add_argument("--rank", type=int, default=64, help="SVD rank of the written adapter")
    merge.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a method parameter, e.g. density=0.3 (repeatable)")
    merge.add_argument("--out", required=True, help="output directory")

    adapters = sub.add_parser("adapters", help="adapter tools")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    check = adapters_sub.add_parser(
        "check", help="validate a store or one adapter against the base, without serving: "
        "served, or refused and why, with the scaling per module group (exit 1 if any refused)")
    check.add_argument("dir", type=Path, help="an adapter store, or one adapter directory")
    check.add_argument("--base", type=Path, default=None,
                       help="base model directory (default: DYNAMERGE_BASE_MODEL, else the demo)")

    zoo = sub.add_parser("zoo", help="the embedded demo zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_sub.add_parser("build", help="convert the demo base model from its GGUF (once)")
    train = zoo_sub.add_parser("train", help="train the six demo adapters, then evaluate")
    train.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    synth = zoo_sub.add_parser(
        "synth", help="write N synthetic adapters of the base's shapes (a zoo for scale tests)")
    synth.add_argument("--adapters", type=int, required=True, help="how many")
    synth.add_argument("--out", type=Path, required=True, help="the store directory to fill")
    synth.add_argument("--seed", type=int, default=0)
    evaluate = zoo_sub.add_parser("eval", help="exact-match table: base and every expert")
    evaluate.add_argument("--limit", type=int, default=None, help="prompts per task")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return _COMMANDS[args.command](args)


def _routing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--temperature-route", type=float, default=None, dest="route_temperature")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--scoring", choices=["centroid", "knn"], default=None)


def _engine():
    from app.engine.engine import Engine
    from app.settings import Settings

    engine = Engine(Settings())
    engine.load()
    return engine


def _routing_options(engine, args: argparse.Namespace):
    return engine.routing_options(
        top_k=args.top_k, temperature=args.route_temperature, threshold=args.threshold,
        scoring=args.scoring,
    )


def _serve(args: argparse.Namespace) -> int:
    from app.main import serve
    from app.settings import Settings

    return serve(Settings())


def _route(args: argparse.Namespace) -> int:
    engine = _engine()
    decision = engine.route(args.text, _routing_options(engine, args))
    chosen = {hit.adapter_id: hit.weight for hit in decision.hits}
    print(f"\n{'adapter':<16} {'score':>8} {'weight':>8}")
    for adapter_id, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        weight = f"{chosen[adapter_id]:8.4f}" if adapter_id in chosen else f"{'-':>8}"
        print(f"{adapter_id:<16} {score:8.4f} {weight}")
    print(f"\nfallback: {decision.fallback}   routing: {decision.latency_s * 1000:.1f} ms")
    print("nearest exemplars:")
    for ex in decision.nearest:
        print(f"  {ex.score:6.3f}  [{ex.adapter_id}] {ex.text}")
    engine.shutdown()
    return 0


def _generate(args: argparse.Namespace) -> int:
    from app.engine.types import GenerationRequest, SamplingParams

    engine = _engine()
    request = GenerationRequest(
        prompt=engine.render_chat([{"role": "user", "content": args.text}]),
        route_text=args.text,
        model=args.model,
        routing=_routing_options(engine, args),
        sampling=SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed,
        ),
    )
    stream = engine.submit(request)
    blend = ", ".join(f"{a}={w:.3f}" for a, w in stream.admission.blend) or "base model"
    print(f"[blend: {blend}]", file=sys.stderr)
    for event in stream:
        print(event.text, end="", flush=True)
    print()
    engine.shutdown()
    return 0


def _merge(args: argparse.Namespace) -> int:
    from adapters.export import write_peft_adapter

    ids = [a.strip() for a in args.adapters.split(",") if a.strip()]
    weights = [float(w) for w in args.weights.split(",")]
    if len(ids) != len(weights):
        raise SystemExit(f"{len(ids)} adapters but {len(weights)} weights")
    params = tuple((name, _number(value)) for name, _, value in
                   (p.partition("=") for p in args.param))
    engine = _engine()
    unknown = [a for a in ids if a not in engine.models()[2:]]
    if unknown:
        raise SystemExit(f"unknown adapters: {unknown}")
    spec = engine.merge_spec(args.method, dict(params), "svd", args.rank)
    virtual = engine.static_merge(tuple(zip(ids, weights, strict=True)), spec)
    exemplars = [t for a in ids for t in engine.store.spec(a).exemplars]
    out = write_peft_adapter(virtual, Path(args.out), str(engine.settings.base_model or
                             "SmolLM2-135M-Instruct"), exemplars)
    print(f"wrote {out} ({args.method}, rank {args.rank}, relative Frobenius error "
          f"{virtual.relative_error:.4f}, {virtual.build_seconds:.1f} s)")
    engine.shutdown()
    return 0


def _number(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _zoo(args: argparse.Namespace) -> int:
    from adapters.zoo import evaluate as zoo_eval
    from adapters.zoo import train as zoo_train
    from adapters.zoo.base import ensure_demo_base
    from app.settings import Settings

    settings = Settings()
    if args.zoo_command == "build":
        print(ensure_demo_base(settings.cache_dir))
    elif args.zoo_command == "synth":
        from adapters.zoo.synth import synth_zoo
        from app.engine.base_model import base_model_path

        ids = synth_zoo(base_model_path(settings), args.out, args.adapters, seed=args.seed)
        print(f"wrote {len(ids)} adapters to {args.out}")
    elif args.zoo_command == "train":
        tasks = args.tasks.split(",") if args.tasks else None
        zoo_train.train(settings.cache_dir, tasks=tasks)
        print(zoo_eval.format_table(zoo_eval.evaluate(settings.cache_dir)))
    else:
        print(zoo_eval.format_table(zoo_eval.evaluate(settings.cache_dir, limit=args.limit)))
    return 0


def _adapters(args: argparse.Namespace) -> int:
    from app.adapter_check import check_adapters
    from app.engine.base_model import base_model_path
    from app.settings import Settings

    settings = Settings()
    base = args.base or base_model_path(settings)
    report, all_served = check_adapters(args.dir, base, settings.lora_target_modules)
    print(report)
    return 0 if all_served else 1


def _calibrate(args: argparse.Namespace) -> int:
    from app.engine.calibration import standalone_router, store_calibration
    from app.settings import Settings
    from router_index.calibrate import format_tables

    settings = Settings()
    path = Path(args.out or settings.calibration_file or "calibration.json")
    calibration = store_calibration(standalone_router(settings), settings, path, args.ood,
                                    args.folds, args.max_false_fallback, args.top_k)
    print(format_tables(calibration))
    print(f"\nwrote {path}: temperature={calibration.temperature:g}, fallback rule "
          f"{calibration.fallback}, threshold={calibration.threshold:g}")
    print(f"ship it as <store>/calibration.json (the server then uses it for this store), or "
          f"serve with DYNAMERGE_CALIBRATION_FILE={path.resolve()}")
    return 0


_COMMANDS = {
    "serve": _serve, "route": _route, "generate": _generate, "merge": _merge, "zoo": _zoo,
    "calibrate": _calibrate, "adapters": _adapters,
}

if __name__ == "__main__":
    sys.exit(main())
