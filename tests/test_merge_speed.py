"""Fast merges: per-set contributions, randomized and dense storage, compact half-precision
memo, all against the per-module reference maths (`combine`, full SVD)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from adapters.merge import (
    ModuleInputs,
    compact_low_rank,
    get_merge_method,
    randomized_low_rank,
    relative_error,
    truncated_svd,
)
from adapters.merge.ops import weighted_sum
from adapters.virtual import SetContributions
from app.api.errors import error_body, error_headers
from app.engine.activations import TaskInputsCache, collect_task_inputs
from app.engine.base_model import base_model_path
from app.engine.merging import MergeQueueFullError, Merging, task_inputs_collector
from app.engine.types import MergeSpec

OUT, IN, RANK = 48, 40, 4


def _lora_deltas(k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(OUT, RANK, generator=g) @ torch.randn(RANK, IN, generator=g) * 0.1
            for _ in range(k)]


LINEAR_IN_WEIGHTS = [
    ("ties", {}),
    ("ties", {"majority_sign_method": "frequency", "density": 0.5}),
    ("dare_linear", {"drop_rate": 0.3}),
    ("dare_ties", {}),
    ("dare_ties", {"majority_sign_method": "frequency"}),
    ("neuro", {}),
    ("neuro", {"orthogonal_merge": "coordinate"}),
    ("neuro", {"lambda_1": 0.5, "lambda_2": 2.0}),
]


@pytest.mark.parametrize(("name", "overrides"), LINEAR_IN_WEIGHTS)
def test_contributions_weighted_equal_the_reference_combine(name, overrides):
    """sum_k w_k E_k == combine(prepared, w) for several weight vectors, negative ones too
    (float32; tolerance 1e-5 relative to the result's largest entry)."""
    method = get_merge_method(name)
    params = method.params(**overrides)
    deltas = _lora_deltas(3)
    base = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(9))
    inputs = ModuleInputs(base_weight=base, adapter_keys=["a/m", "b/m", "c/m"])
    prepared = method.prepare(deltas, params, inputs)
    contributions = method.contributions(prepared, params)
    assert contributions.shape == (3, OUT, IN)
    for weights in ([0.6, 0.3, 0.1], [1.0, 0.0, 0.0], [0.2, -0.5, 1.3]):
        w = torch.tensor(weights)
        reference = method.combine(prepared, w, params)
        got = weighted_sum(contributions, w)
        scale = float(reference.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, reference, atol=1e-5 * scale, rtol=0)


def test_methods_not_linear_in_their_set_give_no_contributions():
    assert get_merge_method("te").contributions([], get_merge_method("te").params()) is None
    assert get_merge_method("twin").contributions([], get_merge_method("twin").params()) is None


def test_half_stack_error_is_below_a_thousandth():
    """Per-module scaled fp16 keeps the contributions to 2^-11 of the module's largest entry:
    relative Frobenius error of the weighted sum below 1e-3 (the bench reports the real one)."""
    method = get_merge_method("ties")
    params = method.params()
    prepared = method.prepare(_lora_deltas(3, seed=1), params)
    contributions = method.contributions(prepared, params) * 1e-4  # LoRA-sized entries
    half = SetContributions.pack(contributions, half=True)
    assert half.nbytes() < contributions.numel() * 4 / 2 + 64
    w = torch.tensor([0.65, 0.14, 0.07])
    exact = weighted_sum(contributions, w)
    got = half.weighted_sum(w)
    assert got.dtype == torch.float32
    error = float((got - exact).norm() / exact.norm())
    assert 0 < error < 1e-3


def test_half_stack_of_zeros_stays_zero():
    half = SetContributions.pack(torch.zeros(2, 3, 4), half=True)
    assert torch.equal(half.weighted_sum(torch.tensor([1.0, 2.0])), torch.zeros(3, 4))


def test_randomized_low_rank_is_close_to_the_optimal_truncation():
    """Within 5% of Eckart-Young's error at each rank, on a decaying spectrum."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(200, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(150, 120, generator=g))
    s = 0.8 ** torch.arange(120, dtype=torch.float32)
    delta = (u * s) @ v.T
    for rank in (4, 16, 32):
        best = relative_error(delta, *truncated_svd(delta, rank))
        fast = relative_error(delta, *randomized_low_rank(delta, rank))
        assert fast <= 1.05 * best + 1e-6, (rank, fast, best)
    b, a = randomized_low_rank(delta, 8)
    assert b.shape == (200, 8) and a.shape == (8, 150)
    b2, a2 = randomized_low_rank(delta, 8)
    assert torch.equal(b, b2) and torch.equal(a, a2)  # a fixed seed: the same merge, same factors


def test_compact_low_rank_is_exact_for_sums_of_lora_deltas_and_refuses_full_rank():
    deltas = [d * m[:, None] for d, m in zip(
        _lora_deltas(3, seed=4), (torch.rand(OUT) > 0.5 for _ in range(3)), strict=True)]
    te_like = sum(deltas)
    factors = compact_low_rank(te_like, 3 * RANK)
    assert factors is not None and factors[1].shape[0] == 3 * RANK
    assert relative_error(te_like, *factors) < 1e-5
    full = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5))
    assert compact_low_rank(full, 3) is None  # a rank-3 guess misses a full-rank delta
    assert compact_low_rank(full, 30) is None  # factors would not be smaller


def test_float32_set_contributions_are_exact():
    contributions = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(6))
    packed = SetContributions.pack(contributions)
    w = torch.tensor([0.5, -0.25, 2.0])
    for _ in range(2):  # the memo is never changed in place by a sum
        torch.testing.assert_close(packed.weighted_sum(w), weighted_sum(contributions, w),
                                   atol=1e-6, rtol=1e-6)
    assert packed.nbytes() == contributions.numel() * 4


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "neuro", "te"])
def test_engine_builds_equal_the_reference_per_module(micro_engine, method):
    """Two mixes of one set through the engine's factory (the second reuses the memoised
    election): exact storage equals `combine` module by module (dense, or TE's compact
    factors), and randomized rank-r storage reports its true error."""
    merge = get_merge_method(method)
    params = merge.params()
    factory = micro_engine.merging.factory
    for mix in ((("cooking", 0.3), ("math", 0.6), ("travel", 0.1)),
                (("cooking", 0.5), ("math", 0.2), ("travel", 0.3))):
        spec = MergeSpec(method=method, storage="exact")
        virtual = micro_engine.merging.build_static(mix, spec)
        ids, weights = [a for a, _ in mix], [w for _, w in mix]
        for module, stored in virtual.modules.items():
            reference = merge.combine(factory.prepared(merge, params, ids, module), weights,
                                      params)
            got = stored.B if stored.A is None else stored.B @ stored.A
            assert (stored.A is not None) == (method == "te")  # full-rank results stay dense
            torch.testing.assert_close(got, reference, atol=1e-5 * float(reference.abs().max()),
                                       rtol=0)
    low = micro_engine.merging.build_static(mix, MergeSpec(method=method, storage="svd", rank=2))
    assert all(m.A is not None and m.A.shape[0] <= 2 for m in low.modules.values())
    assert 0 < low.relative_error < 1


def _private_merging(engine, **overrides) -> Merging:
    """A Merging of its own over the session engine's adapters and layers (no slots)."""
    settings = engine.settings.model_copy(update=overrides)
    return Merging(settings, engine.merging.adapters, engine.layers, lambda: {},
                   lambda _id: None)


def test_requests_for_one_merge_share_one_build_and_a_full_queue_answers_503(micro_engine):
    merging = _private_merging(micro_engine, merge_max_builds=1, merge_build_queue=0)
    spec = MergeSpec(method="ties", storage="exact")
    mix = (("math", 0.6), ("cooking", 0.4))
    results: list = []
    gate = threading.Event()
    merging._builders.submit(gate.wait)  # stands for a long build on the only builder thread
    try:
        threads = [threading.Thread(target=lambda: results.append(merging.virtual_for(mix, spec)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while merging._pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert merging._pending == 1  # three requests, one build waiting
        with pytest.raises(MergeQueueFullError) as refused:  # another merge: no place left
            merging.virtual_for((("math", 0.5), ("travel", 0.5)), spec)
        assert refused.value.retry_after_s >= 1
        status, body = error_body(refused.value)
        assert status == 503 and body["error"]["code"] == "merge_queue_full"
        assert error_headers(refused.value, status)["Retry-After"].isdigit()
    finally:
        gate.set()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3
    assert len({id(virtual) for virtual, _ in results}) == 1  # one build, shared
    assert sorted(hit for _, hit in results) == [False, True, True]
    stats = merging.cache.stats()
    assert stats.misses == 2 and stats.entries == 1  # the refused one counted as a miss too
    virtual, hit = merging.virtual_for((("math", 0.5), ("travel", 0.5)), spec)  # room again
    assert not hit and virtual.modules


def test_merges_build_on_builder_threads_of_lower_priority(micro_engine):
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if here > 19 - 5:
        pytest.skip("the test runs at a niceness that leaves no room to lower it")
    merging = _private_merging(micro_engine, merge_build_nice=5)
    seen: list[tuple[str, int]] = []
    build = merging.factory.build

    def observed(key, options):  # the real build, with where it ran noted
        seen.append((threading.current_thread().name,
                     os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return build(key, options)

    merging.factory.build = observed
    virtual, hit = merging.virtual_for((("math", 0.6), ("cooking", 0.4)),
                                       MergeSpec(method="ties", storage="exact"))
    assert not hit and virtual.modules
    [(name, nice)] = seen
    assert name.startswith("merge-build") and nice == here + 5
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # caller's kept


def test_te_activations_are_cached_on_disk_and_equal_a_fresh_collection(micro_engine):
    engine = micro_engine
    thread = engine.merging.warm_task_inputs()  # what start-up runs in the background
    thread.join(timeout=60)
    assert not thread.is_alive() and engine.merging._inputs is not None
    folder = Path(engine.settings.cache_dir) / "te_inputs"

    def render(text: str) -> str:
        return engine.render_chat([{"role": "user", "content": text}])

    per_task = engine.settings.te_exemplars_per_task
    disk = TaskInputsCache(folder, base_model_path(engine.settings))
    keys = sorted(disk.key([render(t) for t in list(engine.store.spec(a).exemplars)[:per_task]],
                           per_task) for a in engine.store.ids())
    assert all((folder / f"{k}.safetensors").is_file() for k in keys)  # one file per task
    with engine.model_lock:
        fresh = collect_task_inputs(
            engine.model, engine.layers, engine.tokenizer, render,
            {a: engine.store.spec(a).exemplars for a in engine.store.ids()}, per_task)
    (folder / f"{keys[0]}.safetensors").write_bytes(b"junk")  # a damaged entry: collect again
    cached = task_inputs_collector(engine)()
    for module, by_task in fresh.items():
        for task, inputs in by_task.items():
            torch.testing.assert_close(cached[module][task], inputs, atol=1e-6, rtol=1e-6)
    assert disk.get(keys[0]) is not None  # rewritten

    assert disk.key(["a", "b"], 2) != disk.key(["a", "c"], 2) != disk.key(["a", "b"], 3)
