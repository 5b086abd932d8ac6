"""Non-linear merges per request: virtual adapters against dense references, cache, batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.merge import MergeParameterError, get_merge_method
from app import metrics
from app.engine.blended_lora import BlendBatch
from app.engine.types import GenerationRequest, InvalidRequestError, MergeSpec, SamplingParams

METHODS = ["ties", "dare_ties", "dare_linear", "neuro", "te", "twin"]
MIX = (("math", 0.6), ("cooking", 0.3), ("travel", 0.1))


def _request(engine, method: str, storage: str = "exact", **params) -> GenerationRequest:
    return GenerationRequest(
        prompt=engine.render_chat([{"role": "user", "content": "What is 2 plus 3?"}]),
        route_text="What is 2 plus 3?",
        mix=MIX,
        merge=MergeSpec(method=method, params=tuple(params.items()), storage=storage),
        sampling=SamplingParams(max_tokens=8, temperature=0.0),
    )


def _counter(counter) -> float:
    return counter._value.get()


def _virtual_logits(engine, virtual_id: str, input_ids: torch.Tensor) -> torch.Tensor:
    rows = [[(engine.slots.slot_of(virtual_id), 1.0)]]
    with engine.model_lock, torch.inference_mode():
        engine.context.batch = BlendBatch.from_rows(rows, engine.device, engine.dtype)
        try:
            return engine.model(input_ids=input_ids).logits
        finally:
            engine.context.batch = None


@pytest.mark.parametrize("method", METHODS)
def test_virtual_adapter_equals_dense_merge(micro_zoo, micro_engine, method):
    """Stored exactly, the merged adapter in its slot gives the logits of W + merged delta."""
    before = {v.id for v in micro_engine.merging.cache.values()}
    stream = micro_engine.submit(_request(micro_engine, method))
    stream.result()
    (virtual,) = [v for v in micro_engine.merging.cache.values()
                  if v.id not in before]  # other tests may have merged too
    assert virtual.relative_error == 0.0

    merge = get_merge_method(method)
    params = merge.params()
    dense = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32).eval()
    ids = [a for a, _ in sorted(MIX)]
    weights = [w for _, w in sorted(MIX)]
    factory = micro_engine.merging.factory
    with torch.no_grad():
        for module in virtual.modules:
            prepared = factory.prepared(merge, params, ids, module)  # memoised per adapter
            merged = merge.combine(prepared, weights, params)
            dense.get_submodule(module).weight += merged
    input_ids = torch.randint(0, 400, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = dense(input_ids=input_ids).logits
    torch.testing.assert_close(_virtual_logits(micro_engine, virtual.id, input_ids), reference,
                               atol=2e-4, rtol=0)


def test_cache_hit_skips_the_build_and_repeats_the_output(micro_engine):
    request = _request(micro_engine, "ties", storage="svd", density=0.5)
    first = micro_engine.submit(request)
    text, _ = first.result()
    hits, misses = _counter(metrics.MERGE_CACHE_HITS), _counter(metrics.MERGE_CACHE_MISSES)
    second = micro_engine.submit(request)
    assert second.result()[0] == text
    assert second.admission.cache_hit is True and second.admission.method == "ties"
    assert _counter(metrics.MERGE_CACHE_HITS) == hits + 1
    assert _counter(metrics.MERGE_CACHE_MISSES) == misses


def test_methods_in_one_batch_match_alone(micro_engine):
    requests = [_request(micro_engine, m) for m in ["linear", "ties", "twin", "neuro"]]
    requests.append(GenerationRequest(requests[0].prompt, "x", model="base",
                                      sampling=requests[0].sampling))
    alone = [micro_engine.submit(r).result()[0] for r in requests]
    streams = [micro_engine.submit(r) for r in requests]
    assert [s.result()[0] for s in streams] == alone


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MergeSpec(method="slerp"), "unknown merge method"),
        (MergeSpec(method="ties", params=(("density", 1.5),)), "density"),
        (MergeSpec(method="ties", params=(("bogus", 1),)), "unknown parameter 'bogus'"),
        (MergeSpec(method="ties", storage="zip"), "merge.storage"),
        (MergeSpec(method="ties", rank=0), "merge.rank"),
        # in range, but the merged weights overflow fp32 (found by the fuzz test)
        (MergeSpec(method="neuro", params=(("lambda_2", 1.5e124),), storage="svd"),
         "not finite"),
    ],
)
def test_bad_merge_options_are_refused(micro_engine, spec, match):
    request = _request(micro_engine, "ties")
    with pytest.raises((MergeParameterError, InvalidRequestError), match=match):
        micro_engine.submit(GenerationRequest(request.prompt, "x", mix=MIX, merge=spec))


def test_eviction_respects_the_budget_and_frees_slots(micro_engine):
    cache = micro_engine.merging.cache
    budget = cache.budget_bytes
    try:
        small = _request(micro_engine, "dare_linear", storage="svd", drop_rate=0.3)
        micro_engine.submit(small).result()
        one = max(v.nbytes() for v in cache.values() if v.method == "dare_linear")
        cache.budget_bytes = one + one // 2  # room for one such merge, not two
        evictions = _counter(metrics.MERGE_CACHE_EVICTIONS)
        for rate in (0.1, 0.2, 0.4):
            micro_engine.submit(_request(micro_engine, "dare_linear", storage="svd",
                                         drop_rate=rate)).result()
            assert cache.stats().bytes_used <= cache.budget_bytes
        assert _counter(metrics.MERGE_CACHE_EVICTIONS) >= evictions + 2
        live = micro_engine.slots.resident("virtual")
        assert len(live) <= cache.stats().entries  # evicted merges left their slots
    finally:
        cache.budget_bytes = budget


def test_more_distinct_merges_than_slots_all_run(micro_engine):
    """Merges live in the device's virtual slots: more distinct merges than slots must all
    run, the least recently used idle ones making room, however small the merges are."""
    cache = micro_engine.merging.cache
    cap = cache.max_entries
    free = micro_engine.slots.num_virtual
    try:
        cache.max_entries = 2
        for i in range(free + 2):
            rate = 0.01 * (i + 1)
            request = _request(micro_engine, "dare_linear", storage="svd", drop_rate=rate)
            _, final = micro_engine.submit(request).result()
            assert final.finish_reason in ("stop", "length"), f"merge {i} failed"
            assert cache.stats().entries <= 2
        assert len(micro_engine.slots.resident("virtual")) <= 2  # evicted ones left their slots
    finally:
        cache.max_entries = cap


def test_static_export_loads_in_peft_and_in_our_registry(micro_zoo, micro_engine, tmp_path):
    """`dynamerge merge --out`: at full rank the written adapter is the merge, exactly."""
    from peft import PeftModel

    from adapters.export import write_peft_adapter
    from adapters.registry import load_adapter

    spec = MergeSpec(method="ties", params=(("density", 0.5),), storage="svd", rank=128)
    virtual = micro_engine.merging.build_static(MIX, spec)
    assert virtual.relative_error < 1e-5
    store = tmp_path / "store"
    write_peft_adapter(virtual, store / "merged", "micro", ["a prompt"])

    exported = load_adapter(store, "merged", micro_engine.slots.base_shapes())
    for name, module in virtual.modules.items():
        torch.testing.assert_close(exported.modules[name].delta(), module.B @ module.A,
                                   atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, store / "merged").eval()
    input_ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = peft_model(input_ids=input_ids).logits
    with micro_engine.model_lock, micro_engine.residency._lock:
        slot, _ = micro_engine.slots.claim("virtual")
        micro_engine.slots.write(slot, virtual)
    try:
        ours = _virtual_logits(micro_engine, virtual.id, input_ids)
    finally:
        micro_engine.residency.retire(virtual.id)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
