"""Exemplar embeddings cached on disk, so that a restart does not re-embed the whole zoo.

One `.npy` file per (embedder, exemplar texts): the key hashes the embedder's identity and
the texts, so a changed exemplar file, or another embedder, simply misses. Writes are atomic
(temp file, then rename), so a crash never leaves a truncated entry behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Args:
        directory: where entries live (created on first write).
        embedder_id: identifies the embedding model (name, dimension, weights' digest).
    """

    def __init__(self, directory: Path, embedder_id: str) -> None:
        self.directory = Path(directory)
        self.embedder_id = embedder_id
        self.hits = 0
        self.misses = 0

    def key(self, texts: Sequence[str]) -> str:
        digest = hashlib.sha256(self.embedder_id.encode())
        for text in texts:
            digest.update(b"\x00")
            digest.update(text.encode("utf-8"))
        return digest.hexdigest()

    def get_or_embed(
        self, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """The embeddings of `texts`, read from the cache or computed by `embed` and stored."""
        path = self.directory / f"{self.key(texts)}.npy"
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                self.hits += 1
                return vectors
        except (OSError, ValueError):
            pass  # missing or unreadable: embed again
        self.misses += 1
        vectors = np.ascontiguousarray(embed(list(texts)), dtype=np.float32)
        self._write(path, vectors)
        return vectors

    def _write(self, path: Path, vectors: np.ndarray) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, vectors, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache costs time, not correctness
            log.warning("could not write the embedding cache %s: %s", self.directory, exc)


_SAMPLE = 1 << 16  # bytes hashed at each end of a large weights file


def embedder_identity(path: Path, name: str, dim: int) -> str:
    """A stable id of an embedding model: its name, dimension and its files' digests (small
    files whole; large ones by size and both ends, which any retraining changes)."""
    digest = hashlib.sha256(f"{name}:{dim}".encode())
    root = Path(path)
    for file in sorted(root.rglob("*")):
        if not file.is_file() or file.suffix not in (".safetensors", ".bin", ".json", ".txt"):
            continue
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}".encode())
        with file.open("rb") as f:
            if size <= 2 * _SAMPLE:
                digest.update(f.read())
            else:
                digest.update(f.read(_SAMPLE))
                f.seek(-_SAMPLE, os.SEEK_END)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]
