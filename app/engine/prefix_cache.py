"""Prefix cache: prompt KV kept after a request, reused by the next one with the same start.

A prefix's keys and values depend on the adapter mix (LoRA reaches k and v, and every layer
feeds the next), so the key of a block of `block` tokens is a hash chain over the BLEND and
every token up to the block's end (vLLM's block hash, with our blend where it has a LoRA id).
A lookup walks the chain from the first block and stops at the first miss: the longest cached
prefix. Blocks live in an LRU bounded in bytes; a chain's parents are kept more recent than
its children, so eviction trims chains from their ends and never strands a child.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from app import metrics

BlendKey = str


def blend_key(merge: object, blend: Sequence[tuple[str, float]]) -> BlendKey:
    """The identity of a mix, as far as KV is concerned: the merge (method and parameters,
    which make a non-linear merge's virtual adapter), the adapters and their exact weights
    (`repr` of a float is exact)."""
    return repr((merge, tuple((a, float(w)) for a, w in blend)))


class PrefixCache:
    """Blocks of `block` tokens: per layer `(keys, values)` `[heads, block, dim]`.

    Args:
        capacity_bytes: the most bytes of cached states; 0 disables the cache.
        block: tokens per block (the granularity of reuse).
    """

    def __init__(self, capacity_bytes: int, block: int = 16) -> None:
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.bytes_used = 0
        # Bumped when an adapter id may come to mean other weights (removed, re-registered):
        # keys made before no longer match, and their blocks age out of the LRU.
        self.epoch = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # [layers, 2, h, blk, d]

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def entries(self) -> int:
        return len(self._blocks)

    def forget_all(self) -> None:
        """Make every cached block unreachable (callable from any thread)."""
        self.epoch += 1

    def _chain(self, key: BlendKey, tokens: Sequence[int], blocks: int) -> list[bytes]:
        digest = hashlib.sha256(f"{self.epoch}:{key}".encode()).digest()
        out = []
        for i in range(blocks):
            chunk = tokens[i * self.block:(i + 1) * self.block]
            digest = hashlib.sha256(digest + b"".join(t.to_bytes(4, "little") for t in chunk)
                                    ).digest()
            out.append(digest)
        return out

    def lookup(self, key: BlendKey, tokens: Sequence[int], limit: int
               ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The cached states of the longest prefix of `tokens` (at most `limit` tokens) under
        `key`, per layer `[1, heads, n, dim]`; None when not even one block is cached."""
        if not self.enabled:
            return None
        found = []
        for digest in self._chain(key, tokens, limit // self.block):
            entry = self._blocks.get(digest)
            if entry is None:
                break
            found.append((digest, entry))
        if not found:
            return None
        for digest, _ in reversed(found):  # parents end up most recent
            self._blocks.move_to_end(digest)
        stacked = torch.cat([entry for _, entry in found], dim=3)  # [layers, 2, h, n, d]
        return [(layer[0].unsqueeze(0), layer[1].unsqueeze(0)) for layer in stacked]

    def insert(self, key: BlendKey, tokens: Sequence[int],
               layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the full blocks of `tokens`, whose states per layer are `[heads, n, dim]`
        (n = len(tokens)); blocks already cached are only touched."""
        if not self.enabled:
            return
        chain = self._chain(key, tokens, len(tokens) // self.block)
        for i, digest in enumerate(chain):
            if digest in self._blocks:
                continue
            s = slice(i * self.block, (i + 1) * self.block)
            entry = torch.stack([torch.stack([k[:, s], v[:, s]]) for k, v in layers])
            size = entry.numel() * entry.element_size()
            if size > self.capacity_bytes:
                return
            self._blocks[digest] = entry
            self.bytes_used += size
        for digest in reversed(chain):
            self._blocks.move_to_end(digest)
        self._evict()

    def _evict(self) -> None:
        while self.bytes_used > self.capacity_bytes and self._blocks:
            _, entry = self._blocks.popitem(last=False)
            self.bytes_used -= entry.numel() * entry.element_size()
            metrics.PREFIX_CACHE_EVICTIONS.inc()
