"""The blended layers on tiny random models of common architectures, against PEFT's forward.

For each architecture two adapters are made by PEFT (random A and B, scaled up so that they
change greedy tokens), loaded by our registry and written into device slots. Compared with
PEFT: each adapter alone (PeftModel's forward), a two-adapter blend (the dense model
W + sum_i w_i * delta_i, with each delta from PEFT's `get_delta_weight`), and every row of a
mixed batch (prefill of several tokens then one decode step through the KV cache) against
the same row alone. Tolerance: float32 throughout, logits O(1): 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from adapters.registry import load_adapter
from app.engine.blended_lora import BlendBatch, BlendContext, install_blended_layers
from app.engine.device_slots import DeviceSlots
from tests.tiny_archs import ARCHS, make_adapter, save_tiny, tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    save_tiny(model_type, root / "base")
    _, targets = ARCHS[model_type]
    store = root / "store"
    make_adapter(tiny_model(model_type), store / "one", seed=1, target_modules=targets)
    make_adapter(tiny_model(model_type), store / "two", seed=2, target_modules=targets[:2],
                 r=2, lora_alpha=16, use_rslora=True)
    model = tiny_model(model_type)
    context = BlendContext()
    layers = install_blended_layers(model, None, context, num_slots=3)
    bank = DeviceSlots(layers, num_adapters=2, num_virtual=1)
    adapters = {}
    for adapter_id in ("one", "two"):
        adapters[adapter_id] = load_adapter(store, adapter_id, bank.base_shapes())
        slot, _ = bank.claim("adapter")
        bank.write(slot, adapters[adapter_id])
    return model_type, root, model, context, bank, adapters


def _run(model, context, rows, input_ids, past=None):
    context.batch = BlendBatch.from_rows(rows, input_ids.device, torch.float32)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, cache=past, use_cache=True)
    finally:
        context.batch = None
    return out.logits, out.cache


def _ids(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_each_adapter_equals_peft(arch):
    model_type, root, model, context, bank, _ = arch
    ids = _ids(0, 1, 10)
    base_logits, _ = _run(model, context, [[]], ids)
    for adapter_id in ("one", "two"):
        peft_model = PeftModel.from_pretrained(tiny_model(model_type),
                                               root / "store" / adapter_id).eval()
        with torch.no_grad():
            reference = peft_model(input_ids=ids).logits
        ours, _ = _run(model, context, [[(bank.slot_of(adapter_id), 1.0)]], ids)
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
        assert (ours - base_logits).abs().max() > 100 * ATOL, "the adapter must change logits"
        assert torch.equal(ours[0].argmax(-1), reference[0].argmax(-1))


def test_blend_equals_peft_deltas(arch):
    model_type, root, model, context, bank, _ = arch
    mix = {"one": 0.7, "two": 0.3}
    reference = tiny_model(model_type)
    for adapter_id, weight in mix.items():
        peft_model = PeftModel.from_pretrained(tiny_model(model_type),
                                               root / "store" / adapter_id)
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in module.lora_A:
                with torch.no_grad():
                    reference.get_submodule(name).weight += weight * module.get_delta_weight(
                        "default")
    ids = _ids(1, 1, 10)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    ours, _ = _run(model, context, [[(bank.slot_of(a), w) for a, w in mix.items()]], ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_mixed_batch_prefill_and_decode_equal_rows_alone(arch):
    """Rows with different mixes share a prefill and a decode step (defect 5: OPT's fc1/fc2
    see [B*T, H] inputs), plus a dense side slot as non-linear merges leave."""
    _, _, model, context, bank, adapters = arch
    one, two = bank.slot_of("one"), bank.slot_of("two")
    side = bank.num_adapters  # the virtual slot: a dense delta on every targeted layer
    generator = torch.Generator().manual_seed(5)
    for name in adapters["one"].modules:
        layer = bank.layers[name]
        layer.set_side(side, None, 0.05 * torch.randn(layer.out_features, layer.in_features,
                                                      generator=generator))
    try:
        rows = [[], [(one, 1.0)], [(one, 0.6), (two, 0.4)], [(side, 1.0), (two, 0.5)]]
        ids = _ids(2, len(rows), 7)
        logits, past = _run(model, context, rows, ids)
        step = logits[:, -1].argmax(-1, keepdim=True)
        decoded, _ = _run(model, context, rows, step, past)
        for b, row in enumerate(rows):
            alone, alone_past = _run(model, context, [row], ids[b:b + 1])
            torch.testing.assert_close(logits[b:b + 1], alone, atol=ATOL, rtol=0)
            alone_step, _ = _run(model, context, [row], step[b:b + 1], alone_past)
            torch.testing.assert_close(decoded[b:b + 1], alone_step, atol=ATOL, rtol=0)
    finally:
        for name in adapters["one"].modules:
            bank.layers[name].clear_slot(side)
