"""What echo with prompt logprobs costs: one prompt's prefill with every position's logits
(echo, logprobs 1, max_tokens 0, as lm-eval's loglikelihood sends) against the same prefill
keeping the last position only (max_tokens 1), in one run, alternating.

    python bench/echo_cost.py                 # demo base model, 208-token prompt
    python bench/echo_cost.py --repeat 32 --reps 12

Prints the median latency of each and their ratio. Each request starts with a distinct token,
so neither hits the prefix cache (an echoed prompt never takes its prefix from it).
"""

from __future__ import annotations

import argparse
import statistics
import time

from tqdm import tqdm

from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from app.settings import Settings

SENTENCE = "The quick brown fox jumps over the lazy dog and keeps running."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=16, help="sentences in the prompt")
    parser.add_argument("--reps", type=int, default=8, help="requests of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="first reps not counted")
    args = parser.parse_args()
    engine = Engine(Settings(calibration="off"))
    engine.load(show_progress=True)
    prompt = " ".join([SENTENCE] * args.repeat)
    tokens = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    kinds = {"last position": SamplingParams(max_tokens=1, temperature=0),
             "echo": SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for rep in tqdm(range(args.reps), desc="requests"):
            for kind, sampling in kinds.items():
                request = GenerationRequest(prompt=f"{rep} {prompt}", route_text="x",
                                            model="base", sampling=sampling)
                started = time.perf_counter()
                engine.submit(request).result()
                if rep >= args.warmup:
                    times[kind].append(time.perf_counter() - started)
    finally:
        engine.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"prompt {tokens} tokens, median of {len(times['echo'])}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in median.items())
          + f"; echo / last position = {median['echo'] / median['last position']:.2f}")


if __name__ == "__main__":
    main()
