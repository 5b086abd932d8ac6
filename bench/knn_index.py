"""Exact vs approximate (IVF) exemplar search for `knn` scoring: latency, recall, build time.

    python bench/knn_index.py                     # 36k real exemplars, then 144k and 576k
    python bench/knn_index.py --sizes 1 4 --queries 100

The exemplars are real MiniLM embeddings of the synthetic zoo's texts (`adapters.zoo.synth`:
1,250 topics, about 36,000 exemplars). Larger indexes repeat them with a small jitter
(Gaussian, sigma `--jitter`, then renormalised), which keeps the topics' cluster structure
that an IVF index relies on (random unit vectors would have none and understate recall).
Queries are the zoo's held-out phrasings, embedded for real. Recall@m is the share of the
flat index's top `m` exemplars that the IVF search also returns, at the engine's nprobe.

Prints a table; the engine switches to IVF above `DYNAMERGE_KNN_APPROXIMATE_ABOVE` exemplars.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss
import numpy as np
from tqdm.auto import tqdm

from adapters.zoo.synth import _EVAL_SUFFIXES, _EXEMPLAR_SUFFIXES, DOMAINS, FACETS, topic_prompts
from router_index.embedder import Embedder
from router_index.embedding_cache import EmbeddingCache, embedder_identity
from router_index.index import IVF_NPROBE, _exemplar_index

OUT = Path(__file__).resolve().parent / "out"  # the embeddings are cached here between runs


def _texts() -> tuple[list[str], list[str]]:
    exemplars, queries = [], []
    for d in range(len(DOMAINS)):
        for f in range(len(FACETS)):
            exemplars += topic_prompts(d, f, _EXEMPLAR_SUFFIXES)
            queries += topic_prompts(d, f, _EVAL_SUFFIXES)[:1]
    return exemplars, queries


def _timed(index: faiss.Index, queries: np.ndarray, m: int) -> tuple[float, np.ndarray]:
    ids, times = [], []
    for q in queries:
        started = time.perf_counter()
        _, found = index.search(q[None, :], m)
        times.append(time.perf_counter() - started)
        ids.append(found[0])
    return 1000 * float(np.median(times)), np.stack(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16],
                        help="index sizes as multiples of the real exemplars")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--m", type=int, default=10, help="exemplars per kNN query")
    parser.add_argument("--jitter", type=float, default=0.05)
    args = parser.parse_args()

    embedder = Embedder()
    exemplar_texts, query_texts = _texts()
    rng = np.random.default_rng(0)
    query_texts = [query_texts[i] for i in rng.permutation(len(query_texts))[: args.queries]]
    cache = EmbeddingCache(OUT / "embeddings", embedder_identity(embedder.path, embedder.name,
                                                                 embedder.dim))
    base = np.concatenate([cache.get_or_embed(tuple(exemplar_texts[i:i + 512]), embedder.encode)
                           for i in tqdm(range(0, len(exemplar_texts), 512),
                                         desc="embedding exemplars", unit="batch")])
    queries = embedder.encode(query_texts)
    print(f"\n{len(base)} real exemplars, {len(queries)} queries, m={args.m}, "
          f"IVF nprobe={IVF_NPROBE}, 1 thread\n")
    print("| exemplars | flat p50 (ms) | IVF p50 (ms) | recall@m | IVF build (s) |")
    print("|--:|--:|--:|--:|--:|")
    for multiple in args.sizes:
        copies = [base] + [base + args.jitter * rng.standard_normal(base.shape).astype(
            np.float32) for _ in range(multiple - 1)]
        vectors = np.concatenate(copies)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        flat = _exemplar_index(vectors, vectors.shape[1], None, None)
        started = time.perf_counter()
        ivf = _exemplar_index(vectors, vectors.shape[1], 0, None)
        build = time.perf_counter() - started
        flat_ms, exact = _timed(flat, queries, args.m)
        ivf_ms, approx = _timed(ivf, queries, args.m)
        recall = np.mean([len(set(a) & set(e)) / args.m for a, e in zip(approx, exact,
                                                                         strict=True)])
        print(f"| {len(vectors):,} | {flat_ms:.2f} | {ivf_ms:.2f} | {recall:.3f} | "
              f"{build:.1f} |")


if __name__ == "__main__":
    main()
