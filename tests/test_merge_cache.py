"""VirtualAdapterCache: hits skip builds, the byte budget holds, keys round and sort."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from adapters.merge import VirtualAdapterCache, get_merge_method, tensor_nbytes
from adapters.merge.cache import make_key

TIES = get_merge_method("ties").params(density=0.3)


def tensor_of(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


class Builds:
    """A build callback that counts its calls."""

    def __init__(self, nbytes: int = 400) -> None:
        self.calls = 0
        self.nbytes = nbytes

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return tensor_of(self.nbytes)


def test_hit_skips_the_build_and_callbacks_fire():
    events: list[str] = []
    cache = VirtualAdapterCache(10_000, on_hit=lambda k: events.append("hit"),
                                on_miss=lambda k: events.append("miss"),
                                on_build=lambda k, s: events.append("build"))
    key = cache.key(["a", "b"], [0.6, 0.4], "ties", TIES)
    build = Builds()
    first, hit1 = cache.get_or_build(key, build)
    second, hit2 = cache.get_or_build(key, build)
    assert (hit1, hit2) == (False, True)
    assert build.calls == 1 and second is first
    assert events == ["miss", "build", "hit"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes_used) == (1, 1, 1, 400)
    assert stats.build_seconds >= 0


def test_eviction_respects_the_budget_in_lru_order():
    evicted: list[tuple[str, ...]] = []
    cache = VirtualAdapterCache(1000, on_evict=lambda k, v: evicted.append(k.adapter_ids))
    keys = [cache.key([name], [1.0], "linear", None) for name in "abc"]
    cache.get_or_build(keys[0], Builds())
    cache.get_or_build(keys[1], Builds())
    cache.get_or_build(keys[0], Builds())  # touch a: b is now least recently used
    cache.get_or_build(keys[2], Builds())  # 3 x 400 > 1000: evict b
    assert evicted == [("b",)]
    assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
    stats = cache.stats()
    assert stats.bytes_used == 800 <= stats.budget_bytes and stats.evictions == 1


def test_entry_larger_than_budget_is_returned_not_cached():
    cache = VirtualAdapterCache(1000)
    small = cache.key(["a"], [1.0], "linear", None)
    cache.get_or_build(small, Builds())
    big = cache.key(["b"], [1.0], "linear", None)
    value, hit = cache.get_or_build(big, Builds(nbytes=4000))
    assert not hit and value.numel() == 1000
    assert big not in cache and small in cache and cache.stats().evictions == 0


def test_key_rounds_weights_and_sorts_ids_with_them():
    k1 = make_key(["b", "a"], [0.6666, 0.3334], "ties", TIES, step=0.01)
    k2 = make_key(["a", "b"], [0.333, 0.667], "ties", TIES, step=0.01)
    assert k1 == k2 and hash(k1) == hash(k2)
    assert k1.adapter_ids == ("a", "b") and k1.weight_steps == (33, 67)
    assert k1.weights == pytest.approx((0.33, 0.67))
    assert make_key(["a", "b"], [0.35, 0.65], "ties", TIES, step=0.01) != k1
    assert make_key(["a", "b"], [0.333, 0.667], "dare_ties", TIES, step=0.01) != k1
    other = get_merge_method("ties").params(density=0.5)
    assert make_key(["a", "b"], [0.333, 0.667], "ties", other, step=0.01) != k1
    assert make_key(["a", "b"], [0.333, 0.667], "ties", TIES, step=0.1).weight_steps == (3, 7)


@pytest.mark.parametrize(("ids", "weights", "params", "match"), [
    (["a", "a"], [0.5, 0.5], None, "duplicate"),
    (["a"], [0.5, 0.5], None, "1 adapter ids for 2 weights"),
    (["a"], [float("nan")], None, "finite"),
    (["a"], [1.0], {"density": 0.3}, "hashable"),
])
def test_bad_keys_are_rejected(ids, weights, params, match):
    with pytest.raises(ValueError, match=match):
        make_key(ids, weights, "ties", params, step=0.01)


def test_entry_cap_evicts_least_recently_used_beyond_the_count():
    evicted: list[tuple[str, ...]] = []
    cache = VirtualAdapterCache(10**9, max_entries=2,
                                on_evict=lambda k, v: evicted.append(k.adapter_ids))
    keys = [cache.key([name], [1.0], "linear", None) for name in "abcd"]
    for key in keys[:2]:
        cache.get_or_build(key, Builds())
    cache.get_or_build(keys[0], Builds())  # touch a: b is least recently used
    cache.get_or_build(keys[2], Builds())
    cache.get_or_build(keys[3], Builds())
    assert evicted == [("b",), ("a",)]
    assert len(cache) == 2 and cache.stats().evictions == 2
    with pytest.raises(ValueError, match="max_entries"):
        VirtualAdapterCache(100, max_entries=0)


@pytest.mark.parametrize(("budget", "step", "match"), [(-1, 0.01, "budget_bytes"),
                                                        (100, 0.0, "weight_step")])
def test_bad_cache_settings_are_rejected(budget, step, match):
    with pytest.raises(ValueError, match=match):
        VirtualAdapterCache(budget, weight_step=step)


def test_concurrent_misses_on_one_key_build_once():
    cache = VirtualAdapterCache(10_000)
    key = cache.key(["a"], [1.0], "linear", None)
    calls = []

    def slow_build() -> torch.Tensor:
        calls.append(1)
        time.sleep(0.2)
        return tensor_of(400)

    results: list[tuple[torch.Tensor, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build(key, slow_build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 1 and len(results) == 4
    assert sum(not hit for _, hit in results) == 1
    assert all(value is results[0][0] for value, _ in results)


def test_failed_build_is_not_cached_and_is_retried():
    cache = VirtualAdapterCache(10_000)
    key = cache.key(["a"], [1.0], "linear", None)

    def broken() -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build(key, broken)
    assert key not in cache
    _, hit = cache.get_or_build(key, Builds())
    assert not hit and key in cache


def test_invalidate_and_clear_return_what_they_drop():
    cache = VirtualAdapterCache(10_000)
    for ids in (["a", "b"], ["b", "c"], ["c"]):
        cache.get_or_build(cache.key(ids, [0.5] * len(ids), "linear", None), Builds())
    dropped = cache.invalidate("b")
    assert sorted(k.adapter_ids for k, _ in dropped) == [("a", "b"), ("b", "c")]
    assert len(cache) == 1 and cache.stats().bytes_used == 400
    assert len(cache.clear()) == 1 and cache.stats().bytes_used == 0
    assert cache.stats().evictions == 0  # only capacity removals count as evictions


def test_cached_virtual_adapter_is_a_function_of_its_key():
    # build from key.weights: two requests within one step share one exact result
    g = torch.Generator().manual_seed(0)
    deltas = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(4, 3, generator=g)}
    ties = get_merge_method("ties")
    cache = VirtualAdapterCache(10_000, weight_step=0.05)

    def serve(ids, weights):
        key = cache.key(ids, weights, "ties", TIES)
        return cache.get_or_build(
            key, lambda: ties.merge([deltas[i] for i in key.adapter_ids], key.weights, TIES))

    first, _ = serve(["a", "b"], [0.61, 0.39])
    second, hit = serve(["b", "a"], [0.41, 0.59])
    assert hit and second is first
    expected = ties.merge([deltas["a"], deltas["b"]], [0.6, 0.4], TIES)
    torch.testing.assert_close(first, expected)


def test_tensor_nbytes_walks_containers_once_per_tensor():
    @dataclass(frozen=True)
    class Entry:
        b: torch.Tensor
        a: torch.Tensor

    shared = torch.zeros(10)  # 40 bytes
    value = (Entry(shared, torch.zeros(5, dtype=torch.float64)), {"x": shared}, [torch.zeros(2)])
    assert tensor_nbytes(value) == 40 + 40 + 8
