"""The blended layer against references: dense delta maths, PEFT's own forward, rows alone.

Tolerances: everything runs in float32; logits of the 2-layer micro model are O(1), so an
absolute 1e-4 leaves room for summation-order differences and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.registry import load_adapter
from adapters.zoo.micro import MicroZoo
from app.engine.blended_lora import BlendBatch, BlendContext, install_blended_layers
from app.engine.device_slots import DeviceSlots

ATOL = 1e-4
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def blended(micro_zoo: MicroZoo):
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32).eval()
    context = BlendContext()
    layers = install_blended_layers(model, TARGETS, context, num_slots=8)
    bank = DeviceSlots(layers, num_adapters=7, num_virtual=1)
    adapters = {}
    for adapter_id in micro_zoo.adapter_ids:
        adapters[adapter_id] = load_adapter(micro_zoo.store_dir, adapter_id, bank.base_shapes())
        slot, _ = bank.claim("adapter")
        bank.write(slot, adapters[adapter_id])
    return model, context, bank, adapters


def _logits(model, context, rows, input_ids):
    context.batch = BlendBatch.from_rows(rows, input_ids.device, torch.float32)
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        context.batch = None


def _dense_model(micro_zoo: MicroZoo, adapters, mix: dict[str, float]):
    """The reference: a plain model whose weights are W + sum_i w_i * s_i * B_i @ A_i."""
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for adapter_id, weight in mix.items():
            for name, module in adapters[adapter_id].modules.items():
                model.get_submodule(name).weight += weight * module.delta()
    return model


def _random_ids(seed: int, batch: int = 1, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (batch, length), generator=generator)


@pytest.mark.parametrize("seed", range(5))
def test_blend_equals_dense_task_arithmetic(micro_zoo, blended, seed):
    model, context, bank, adapters = blended
    generator = torch.Generator().manual_seed(seed)
    chosen = list(adapters)[: 1 + seed % 3]
    weights = torch.rand(len(chosen), generator=generator).tolist()
    mix = dict(zip(chosen, weights, strict=True))
    input_ids = _random_ids(seed)

    ours = _logits(model, context, [[(bank.slot_of(a), w) for a, w in mix.items()]], input_ids)
    reference = _dense_model(micro_zoo, adapters, mix)(input_ids=input_ids).logits

    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    base = _logits(model, context, [[]], input_ids)
    assert (ours - base).abs().max() > 100 * ATOL, "the blend must actually change the output"


@pytest.mark.parametrize("adapter_id", ["math", "cooking", "travel"])
def test_single_adapter_equals_peft_forward(micro_zoo, blended, adapter_id):
    model, context, bank, _ = blended
    base = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, micro_zoo.store_dir / adapter_id).eval()
    input_ids = _random_ids(7)
    with torch.no_grad():
        reference = peft_model(input_ids=input_ids).logits
    ours = _logits(model, context, [[(bank.slot_of(adapter_id), 1.0)]], input_ids)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_mixed_batch_equals_rows_alone(blended):
    model, context, bank, _ = blended
    slot = bank.slot_of
    rows = [
        [],
        [(slot("math"), 1.0)],
        [(slot("math"), 0.7), (slot("cooking"), 0.3)],
        [(slot("travel"), 0.5), (slot("cooking"), 0.25), (slot("math"), 0.25)],
        [(slot("travel"), 0.2), (slot("travel"), 0.3)],  # a repeated slot adds up
    ]
    input_ids = _random_ids(11, batch=len(rows))
    together = _logits(model, context, rows, input_ids)
    for b, row in enumerate(rows):
        alone = _logits(model, context, [row], input_ids[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        together[4:5], _logits(model, context, [[(slot("travel"), 0.5)]], input_ids[4:5]),
        atol=ATOL, rtol=0,
    )


def test_zero_weights_give_the_base_model(micro_zoo, blended):
    model, context, bank, _ = blended
    input_ids = _random_ids(3)
    plain = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = plain(input_ids=input_ids).logits
    assert BlendBatch.from_rows([[(bank.slot_of("math"), 0.0)]], "cpu", torch.float32) is None
    torch.testing.assert_close(_logits(model, context, [[]], input_ids), reference, atol=ATOL,
                               rtol=0)


def test_rank_growth_keeps_existing_slots(micro_zoo, blended):
    """A later adapter of larger rank re-pads the stacks; the others must be unchanged."""
    model, context, bank, _ = blended
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    before = _logits(model, context, [[(bank.slot_of("math"), 1.0)]], _random_ids(5))
    rank = layer.A.shape[1]
    big_A = torch.randn(rank + 4, layer.in_features)
    big_B = torch.randn(layer.out_features, rank + 4)
    spare = bank.num_adapters + bank.num_virtual - 1
    layer.set_slot(spare, big_A, big_B, 0.5)
    assert layer.A.shape[1] == rank + 4
    after = _logits(model, context, [[(bank.slot_of("math"), 1.0)]], _random_ids(5))
    torch.testing.assert_close(before, after, atol=ATOL, rtol=0)
    x = torch.randn(1, 3, layer.in_features)
    context.batch = BlendBatch.from_rows([[(spare, 2.0)]], "cpu", torch.float32)
    try:
        got = layer(x)
    finally:
        context.batch = None
        layer.clear_slot(spare)
    expected = layer.base(x) + 2.0 * 0.5 * x @ (big_B @ big_A).T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
