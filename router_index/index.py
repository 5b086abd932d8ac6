"""The routing index over per-task exemplar embeddings.

Two inner-product structures are kept side by side:
- one row per task holding the centroid `c_i = mean_j z_i^j`, NOT re-normalised. With unit
  query `z` and unit exemplars, `z . c_i = (1/M) sum_j cos(z, z_i^j)`: Eq. 5 exactly, one
  inner product per task (a dense matrix: every task's score is needed);
- a FAISS inner-product index with one row per exemplar, mapped to its task: kNN scoring.
  Flat (exact) up to `approximate_above` exemplars, an IVF index above (its recall against the
  flat index is measured in bench/router.py); explanations score the candidates' exemplars
  exactly whatever the index.

A `TaskIndex` is immutable: adding or removing a task builds a new one, which the router swaps
in atomically, so requests in flight keep the snapshot they started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import faiss
import numpy as np

# On 2 cores a multi-threaded single-query search is several times slower than one thread.
faiss.omp_set_num_threads(1)
IVF_NPROBE = 16  # lists an approximate search visits (recall vs. time: bench/router.py)
_TRAIN_PER_LIST = 64  # training points per IVF list (k-means on a sample, seeded)


@dataclass(frozen=True)
class TaskIndex:
    task_ids: tuple[str, ...]  # row i of the centroid index is task_ids[i]
    exemplar_texts: tuple[str, ...]  # row j of the exemplar index
    exemplar_task: np.ndarray  # [E] int: task row of each exemplar
    embeddings: np.ndarray  # [E, dim] float32, unit rows
    centroids: np.ndarray  # [N, dim] float32: mean of each task's unit exemplar embeddings
    exemplars: faiss.Index  # E rows: flat, or IVF above `approximate_above`
    task_starts: np.ndarray  # [N + 1]: task i's exemplars are rows task_starts[i]:[i + 1]
    approximate_above: int | None = None  # exemplar count above which kNN is approximate

    @classmethod
    def build(
        cls,
        tasks: Mapping[str, tuple[tuple[str, ...], np.ndarray]],
        approximate_above: int | None = None,
        trained: faiss.Index | None = None,
    ) -> TaskIndex:
        """Build from `{task_id: (exemplar texts, [M_i, dim] unit embeddings)}`.

        Args:
            tasks: the tasks and their exemplars.
            approximate_above: above this many exemplars the kNN index is IVF (None: flat).
            trained: an IVF index of an earlier build whose coarse centroids are reused, so a
                live add or remove does not train again.
        """
        empty = [task for task, (_, vectors) in tasks.items() if len(vectors) == 0]
        if empty:
            raise ValueError(f"tasks without exemplars cannot be routed to: {', '.join(empty)}")
        task_ids = tuple(tasks)
        dim = next(iter(tasks.values()))[1].shape[1] if tasks else 1
        texts: list[str] = []
        rows, owners, centroids = [], [], []
        for row, task in enumerate(task_ids):
            task_texts, vectors = tasks[task]
            texts.extend(task_texts)
            rows.append(vectors)
            owners.extend([row] * len(vectors))
            centroids.append(vectors.mean(axis=0))
        embeddings = np.ascontiguousarray(
            np.concatenate(rows) if rows else np.zeros((0, dim)), dtype=np.float32
        )
        exemplar_index = _exemplar_index(embeddings, dim, approximate_above, trained)
        return cls(
            task_ids=task_ids,
            exemplar_texts=tuple(texts),
            exemplar_task=np.asarray(owners, dtype=np.int64),
            embeddings=embeddings,
            centroids=np.ascontiguousarray(
                np.stack(centroids) if centroids else np.zeros((0, dim)), dtype=np.float32
            ),
            exemplars=exemplar_index,
            task_starts=np.cumsum([0] + [len(r) for r in rows], dtype=np.int64),
            approximate_above=approximate_above,
        )

    @property
    def approximate(self) -> bool:
        return isinstance(self.exemplars, faiss.IndexIVF)

    def vectors_of(self, task: str) -> tuple[tuple[str, ...], np.ndarray]:
        row = self.task_ids.index(task)
        start, end = int(self.task_starts[row]), int(self.task_starts[row + 1])
        return self.exemplar_texts[start:end], self.embeddings[start:end]

    def with_task(self, task: str, texts: tuple[str, ...], vectors: np.ndarray) -> TaskIndex:
        """A new index with `task` added (or replaced)."""
        tasks = {t: self.vectors_of(t) for t in self.task_ids if t != task}
        tasks[task] = (texts, vectors)
        return TaskIndex.build(tasks, self.approximate_above, self._trained())

    def without_task(self, task: str) -> TaskIndex:
        return TaskIndex.build({t: self.vectors_of(t) for t in self.task_ids if t != task},
                               self.approximate_above, self._trained())

    def _trained(self) -> faiss.Index | None:
        return self.exemplars if self.approximate else None

    def centroid_scores(self, query: np.ndarray) -> np.ndarray:
        """Eq. 5 for every task. query: [dim] unit. Returns [N] in task_ids order."""
        # Every task's score is needed (the softmax spans all N), so this is one mat-vec:
        # a FAISS search for k = N also sorts all N (1.6 ms against 0.12 at 10,000 tasks).
        return self.centroids @ query.astype(np.float32, copy=False)

    def nearest(self, query: np.ndarray, m: int) -> list[tuple[int, float]]:
        """The `m` nearest exemplars as (exemplar row, cosine), best first."""
        m = min(m, self.exemplars.ntotal)
        if m == 0:
            return []
        sims, rows = self.exemplars.search(query.reshape(1, -1), m)
        return [(int(j), float(s)) for j, s in zip(rows[0], sims[0], strict=True) if j >= 0]

    def nearest_of_tasks(
        self, query: np.ndarray, task_rows: list[int], m: int
    ) -> list[tuple[int, float]]:
        """The `m` nearest exemplars among those of the tasks `task_rows`, as (exemplar row,
        cosine), best first.

        Exact and independent of the index size, since it scores only those tasks' exemplars:
        a route explains its decision this way, in 0.02 ms, where a search over all 500k
        exemplars of 10,000 tasks took 27 ms.
        """
        if m <= 0 or not task_rows:
            return []
        starts = self.task_starts
        rows = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in task_rows])
        sims = self.embeddings[rows] @ query
        best = np.argsort(-sims, kind="stable")[:m]
        return [(int(rows[i]), float(sims[i])) for i in best]

    def knn_scores(self, query: np.ndarray, m: int) -> np.ndarray:
        """kNN scoring: Eq. 5 restricted to the query's top-`m` exemplars.

        score_i = (1/m) * sum of the cosines of task i's exemplars among the top m; a task
        with none of them scores 0.
        """
        scores = np.zeros(len(self.task_ids), dtype=np.float32)
        hits = self.nearest(query, m)
        for row, sim in hits:
            scores[self.exemplar_task[row]] += sim
        return scores / max(len(hits), 1)


def _exemplar_index(
    embeddings: np.ndarray, dim: int, approximate_above: int | None, trained: faiss.Index | None
) -> faiss.Index:
    """Flat up to `approximate_above` rows; above, IVF with ~4 sqrt(E) lists."""
    count = len(embeddings)
    if approximate_above is None or count <= approximate_above:
        index = faiss.IndexFlatIP(dim)
        if count:
            index.add(embeddings)
        return index
    if trained is not None:
        index = faiss.clone_index(trained)
        index.reset()
    else:
        lists = max(1, int(4 * np.sqrt(count)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(count)[: lists * _TRAIN_PER_LIST]
        index.train(embeddings[np.sort(sample)])
    index.add(embeddings)
    index.nprobe = IVF_NPROBE
    return index
