"""TTFT, TPOT and tokens/s of short routed chats against a running server, one at a time.

    dynamerge serve &        # or any base URL
    python bench/chat_latency.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import statistics
import time

import openai

PROMPTS = [
    "What is 47 plus 38?",
    "Spell 'garden' letter by letter.",
    "Reverse the word order: blue sky over hills",
    "Tell me a short story about a lighthouse keeper.",  # out of domain: falls back to base
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    ttfts, tpots = [], []
    print(f"{'prompt':<34} {'TTFT ms':>8} {'tokens':>6} {'tok/s':>6} {'TPOT ms':>8}  adapters")
    for prompt in PROMPTS * args.rounds:
        started, first, tokens, routing = time.perf_counter(), None, 0, None
        stream = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            routing = routing or getattr(chunk, "routing", None)
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        first = first or end
        tpot = (end - first) / max(tokens - 1, 1)
        ttfts.append(first - started)
        tpots.append(tpot)
        chosen = ",".join(a["id"] for a in (routing or {}).get("adapters", [])) or "base"
        print(f"{prompt[:34]:<34} {(first - started) * 1000:8.1f} {tokens:6d} "
              f"{tokens / (end - started):6.1f} {tpot * 1000:8.1f}  {chosen}")
    print(f"\nmedian TTFT {statistics.median(ttfts) * 1000:.0f} ms, "
          f"median TPOT {statistics.median(tpots) * 1000:.0f} ms "
          f"({1 / statistics.median(tpots):.1f} tokens/s per stream)")


if __name__ == "__main__":
    main()
