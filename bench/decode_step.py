"""One decode step of the demo model: the lean forward (app/engine/lean_decode.py) against
today's transformers forward, batch 1 and 8, base / one adapter / a two-adapter blend / a
top-3 blend, measured alternately in one run (the machine is shared: compare ratios).

    python bench/decode_step.py                    # demo base and zoo, 1 torch thread
    python bench/decode_step.py --threads 2 --steps 40 --reps 9
    python bench/decode_step.py --layouts          # GEMM layouts for [rows, 576] x [576, N]
    python bench/decode_step.py --engine --reps 5  # TPOT through the engine, 1 and 8 clients
    python bench/decode_step.py --join 7 128       # a joining prompt inside the decode forward

Two copies of the base model with the demo adapters in their slots: one as loaded (the
transformers path, `DYNAMERGE_DECODE_PATH=transformers`), one with the lean forward's fused
weights. Every row holds a prompt's states in its KV slot (lengths 100..170 tokens); a step
decodes one token per row at the same column each time (what a step costs does not depend on
which token it is). At batch 8 every row of a blend case has its own mix (different adapters
and weights), as the router gives them. Timed: the KV pool's step bookkeeping and the forward
(the scheduler's sampling, detokenising and streaming are outside). Prints the median TPOT of
each (wall clock) and lean / transformers, the median CPU time of the step's thread (less
disturbed by other processes on a shared machine), the largest logit gap between the paths,
and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from adapters.registry import load_adapter
from app.engine.base_model import base_model_path
from app.engine.blended_lora import BlendBatch, BlendContext, install_blended_layers
from app.engine.device_slots import DeviceSlots
from app.engine.kv_pool import SlotPool, decode_attention_mask
from app.engine.lean_decode import LeanDecoder
from app.settings import DEMO_STORE, Settings

ADAPTERS = ["arithmetic", "json_extract", "reverse_words", "sentiment", "spell",
            "unit_convert"]


def _mixes(batch: int) -> dict[str, list[list[tuple[int, float]]]]:
    """Each case's rows: (slot, weight) pairs; at batch > 1 the blends differ per row."""
    n = len(ADAPTERS)
    return {
        "base": [[] for _ in range(batch)],
        "one adapter": [[(b % n, 1.0)] for b in range(batch)],
        "blend of two": [[(b % n, 0.6 - 0.02 * b), ((b + 1) % n, 0.4 + 0.02 * b)]
                         for b in range(batch)],
        "top-3 blend": [[(b % n, 0.5), ((b + 2) % n, 0.3 - 0.01 * b), ((b + 4) % n, 0.2)]
                        for b in range(batch)],
    }


class _Path:
    """One model copy, its slots and its KV pool, and how it runs a decode step."""

    def __init__(self, lean: bool, batch: int) -> None:
        path = base_model_path(Settings())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model = model
        self.context = BlendContext()
        layers = install_blended_layers(model, None, self.context, len(ADAPTERS))
        bank = DeviceSlots(layers, len(ADAPTERS), 0)
        for adapter_id in ADAPTERS:
            slot, _ = bank.claim("adapter")
            bank.write(slot, load_adapter(DEMO_STORE, adapter_id, bank.base_shapes()))
        self.lean = LeanDecoder(model, self.context) if lean else None
        c = model.config
        self.pool = SlotPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, batch,
                             512, torch.float32, torch.device("cpu"))

    def fill(self, prompts: list[list[int]]) -> None:
        with torch.inference_mode():
            for slot, prompt in enumerate(prompts):
                out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
                self.pool.write(slot, [(layer.keys[0], layer.values[0])
                                       for layer in out.cache.layers])
                self.pool.used[slot] = True

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, blend: BlendBatch | None
             ) -> torch.Tensor:
        hi = ids.shape[0]
        sampled = list(range(hi))
        if self.lean is not None:
            _, lens = self.pool.begin_decode(hi, views=False)
            return self.lean.decode(ids, positions, self.pool.layers, lens, blend, sampled)
        mask, lens = self.pool.begin_decode(hi)
        mask = decode_attention_mask(self.model.config, mask, lens)
        self.context.batch = blend
        try:
            out = self.model(input_ids=ids[:, None], attention_mask=mask,
                             position_ids=positions[:, None], cache=self.pool.cache,
                             use_cache=True, logits_to_keep=1)
        finally:
            self.context.batch = None
        return out.logits[:, -1][sampled]


def layouts(rows: tuple[int, ...] = (1, 2, 4, 8, 16), reps: int = 7) -> None:
    """F.linear on [out, in] against x @ W on [in, out] (contiguous), for a 30-layer chain of
    the demo model's shapes (weights streamed from memory, as in a real step)."""
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
    weights = [[torch.randn(n, k) for n, k in shapes] for _ in range(30)]
    transposed = [[w.t().contiguous() for w in ws] for ws in weights]

    def chain(m: int, pre: bool) -> float:
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        started = time.perf_counter()
        for layer in range(30):
            for i, (_, k) in enumerate(shapes):
                if pre:
                    torch.mm(xs[k], transposed[layer][i])
                else:
                    F.linear(xs[k], weights[layer][i])
        return time.perf_counter() - started

    for m in rows:
        a, b = [], []
        for _ in range(reps):
            a.append(chain(m, False))
            b.append(chain(m, True))
        print(f"rows {m:2d}: F.linear [out,in] {statistics.median(a) * 1e3:6.2f} ms, "
              f"x @ W [in,out] {statistics.median(b) * 1e3:6.2f} ms "
              f"({statistics.median(b) / statistics.median(a):.2f}x)")


def engine_tpot(clients: tuple[int, ...], reps: int, tokens: int) -> None:
    """TPOT through the engine (scheduler, sampling and detokenising included, no HTTP): two
    engines, `decode_path` transformers and lean, one request after another (1 client) or
    `n` at once with different mixes, alternating between the engines."""
    from app.engine.engine import Engine
    from app.engine.types import GenerationRequest, SamplingParams

    engines = {}
    for path in ("transformers", "lean"):
        engines[path] = Engine(Settings(calibration="off", decode_path=path,
                                        max_batch_size=max(clients)))
        engines[path].load(show_progress=False)
    question = "Explain in a few sentences why the sky is blue."
    cases = {"base": lambda b: ("base", None),
             "one adapter": lambda b: (ADAPTERS[b % 6], None),
             "blend of two": lambda b: ("auto", ((ADAPTERS[b % 6], 0.6 - 0.02 * b),
                                                 (ADAPTERS[(b + 1) % 6], 0.4 + 0.02 * b)))}

    def run(engine, n: int, case: str) -> float:
        prompt = engine.render_chat([{"role": "user", "content": question}])
        streams = []
        for b in range(n):
            model, mix = cases[case](b)
            streams.append(engine.submit(GenerationRequest(
                prompt=prompt, route_text=question, model=model, mix=mix,
                sampling=SamplingParams(max_tokens=tokens, temperature=0.0,
                                        ignore_eos=True))))
        tpots: list[float] = []

        def read(stream) -> None:  # one reader per stream: stamps when tokens arrive
            stamps = [time.perf_counter() for event in stream if event.token_ids]
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

        readers = [threading.Thread(target=read, args=(stream,)) for stream in streams]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        return statistics.median(tpots)

    rows = []
    try:
        for n in clients:
            for case in cases:
                times: dict[str, list[float]] = {name: [] for name in engines}
                for _ in tqdm(range(reps), desc=f"{n} clients {case}", leave=False):
                    for name, engine in engines.items():
                        times[name].append(run(engine, n, case))
                tpot = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                rows.append((n, case, tpot["transformers"], tpot["lean"]))
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"load average after: {os.getloadavg()}")
    print("| clients | case | transformers TPOT (ms) | lean TPOT (ms) | lean / transformers |")
    print("|--:|---|--:|--:|--:|")
    for n, case, old, new in rows:
        print(f"| {n} | {case} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


def join_cost(decoding: int, chunk: int, steps: int, reps: int) -> None:
    """A row joining while `decoding` rows decode, on the lean path: today's two forwards (the
    decode step, then the joining prompt's prefill by transformers) against one ragged
    forward (`LeanDecoder.forward_rows`: the decode tokens and the prompt chunk together)."""
    path = _Path(True, decoding + 1)
    assert path.lean is not None
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49000, (100 + 10 * b,), generator=gen).tolist()
               for b in range(decoding)]
    path.fill(prompts)
    joining = torch.randint(3, 49000, (chunk,), generator=gen)
    mixes = _mixes(decoding + 1)["blend of two"]
    ids = torch.tensor([p[-1] for p in prompts])
    positions = torch.tensor([len(p) for p in prompts])
    lens = positions.clone()
    decode_blend = BlendBatch.from_rows(mixes[:decoding], torch.device("cpu"), torch.float32)
    join_blend = BlendBatch.from_rows(mixes[decoding:], torch.device("cpu"), torch.float32)
    all_blend = BlendBatch.from_rows(mixes, torch.device("cpu"), torch.float32)
    rows = [(b, len(p), 1) for b, p in enumerate(prompts)] + [(decoding, 0, chunk)]
    ragged_ids = torch.cat([ids, joining])
    sampled = [*range(decoding), decoding + chunk - 1]

    @torch.inference_mode()
    def two_forwards() -> None:
        path.lean.decode(ids, positions, path.pool.layers, lens, decode_blend)
        path.context.batch = join_blend
        try:
            path.model(input_ids=joining[None], use_cache=True, logits_to_keep=1)
        finally:
            path.context.batch = None

    def one_forward() -> None:
        path.lean.forward_rows(ragged_ids, path.pool.layers, rows, all_blend, sampled)

    times: dict[str, list[float]] = {"decode + prefill": [], "one ragged forward": []}
    for _ in tqdm(range(reps), desc="join", leave=False):
        for name, run in (("decode + prefill", two_forwards), ("one ragged forward",
                                                               one_forward)):
            started = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - started) / steps)
    print(f"load average after: {os.getloadavg()}")
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{decoding} rows decoding, one joining with a {chunk}-token prompt (lean, blends of "
          "two): " + ", ".join(f"{k} {v:.1f} ms" for k, v in median.items())
          + f"; one / two = {median['one ragged forward'] / median['decode + prefill']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timing")
    parser.add_argument("--reps", type=int, default=7, help="alternating timings per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine: 1)")
    parser.add_argument("--layouts", action="store_true", help="only the GEMM layout check")
    parser.add_argument("--engine", action="store_true",
                        help="TPOT through two engines (transformers, lean): --batches are "
                             "clients at once")
    parser.add_argument("--tokens", type=int, default=32, help="--engine: tokens per request")
    parser.add_argument("--join", type=int, nargs=2, metavar=("ROWS", "CHUNK"),
                        help="a row joining ROWS decoding ones with a CHUNK-token prompt: two "
                             "forwards against one ragged forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}, torch threads {args.threads}")
    if args.layouts:
        layouts()
        return
    if args.join:
        join_cost(args.join[0], args.join[1], args.steps, args.reps)
        return
    if args.engine:
        engine_tpot(tuple(args.batches), args.reps, args.tokens)
        return
    top = max(args.batches)
    paths = {"transformers": _Path(False, top), "lean": _Path(True, top)}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49000, (100 + 10 * b,), generator=gen).tolist()
               for b in range(top)]
    for path in paths.values():
        path.fill(prompts)
    results = []
    for batch in args.batches:
        ids = torch.tensor([p[-1] for p in prompts[:batch]])
        positions = torch.tensor([len(p) for p in prompts[:batch]])
        for case, rows in _mixes(batch).items():
            blend = BlendBatch.from_rows(rows, torch.device("cpu"), torch.float32)
            times: dict[str, list[float]] = {name: [] for name in paths}
            cpu: dict[str, list[float]] = {name: [] for name in paths}
            outputs = {name: path.step(ids, positions, blend) for name, path in paths.items()}
            gap = float((outputs["lean"] - outputs["transformers"]).abs().max())
            for _ in tqdm(range(args.reps), desc=f"batch {batch} {case}", leave=False):
                for name, path in paths.items():
                    started, started_cpu = time.perf_counter(), time.thread_time()
                    for _ in range(args.steps):
                        path.step(ids, positions, blend)
                    times[name].append((time.perf_counter() - started) / args.steps)
                    cpu[name].append((time.thread_time() - started_cpu) / args.steps)
            tpot = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            busy = {name: statistics.median(t) * 1e3 for name, t in cpu.items()}
            results.append((batch, case, tpot["transformers"], tpot["lean"], busy["transformers"],
                            busy["lean"], gap))
    print(f"load average after: {os.getloadavg()}")
    print("| batch | case | transformers TPOT (ms) | lean TPOT (ms) | lean / transformers "
          "| CPU ms: transformers / lean (ratio) | max logit gap |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for batch, case, old, new, old_cpu, new_cpu, gap in results:
        print(f"| {batch} | {case} | {old:.1f} | {new:.1f} | {new / old:.2f} "
              f"| {old_cpu:.1f} / {new_cpu:.1f} ({new_cpu / old_cpu:.2f}) | {gap:.1e} |")


if __name__ == "__main__":
    main()
