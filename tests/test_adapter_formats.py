"""Adapter formats users ship, each served exactly or refused by name (issue 22's defects).

Every adapter here is made by PEFT itself on a tiny random Llama; served ones are compared with
PeftModel's forward (float32, 1e-4 absolute on O(1) logits).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from adapters.errors import IncompatibleAdapterError
from adapters.registry import inspect_adapter, list_store, load_adapter
from app.engine.blended_lora import BlendBatch, BlendContext, install_blended_layers
from app.engine.device_slots import DeviceSlots
from tests.tiny_archs import make_adapter, tiny_model

ATOL = 1e-4


def _served_equals_peft(store: Path, adapter_id: str, peft_dir: Path) -> None:
    """Load through our registry into blended layers; compare with PEFT's forward."""
    model = tiny_model("llama")
    context = BlendContext()
    layers = install_blended_layers(model, None, context, num_slots=1)
    bank = DeviceSlots(layers, num_adapters=1, num_virtual=0)
    adapter = load_adapter(store, adapter_id, bank.base_shapes(),
                           base_weight=lambda name: layers[name].weight)
    slot, _ = bank.claim("adapter")
    bank.write(slot, adapter)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    context.batch = BlendBatch.from_rows([[(slot, 1.0)]] * 2, ids.device, torch.float32)
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        context.batch = None
    reference = PeftModel.from_pretrained(tiny_model("llama"), peft_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def _shapes() -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in tiny_model("llama").named_modules()
            if isinstance(m, torch.nn.Linear)}


def _refusal(store: Path, adapter_id: str) -> str:
    with pytest.raises(IncompatibleAdapterError) as info:
        inspect_adapter(store, adapter_id, _shapes(),
                        base_weight=lambda n: tiny_model("llama").get_submodule(n).weight)
    return str(info.value)


def test_lm_head_lora_with_unchanged_base_copy_is_served(tmp_path):
    """Defect 9: PEFT's save_embedding_layers="auto" saves lm_head.base_layer.weight."""
    make_adapter(tiny_model("llama"), tmp_path / "head", seed=1,
                 target_modules=["q_proj", "lm_head"])
    assert any(k.endswith("lm_head.base_layer.weight")
               for k in load_file(tmp_path / "head" / "adapter_model.safetensors"))
    _served_equals_peft(tmp_path, "head", tmp_path / "head")


def test_changed_base_copy_is_refused(tmp_path):
    make_adapter(tiny_model("llama"), tmp_path / "head", seed=1, target_modules=["lm_head"])
    weights = tmp_path / "head" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("base_layer.weight"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights)
    assert "changed weight for lm_head" in _refusal(tmp_path, "head")


def test_bias_flag_judged_by_tensors(tmp_path):
    """Defect 9: bias="lora_only" on a base without biases saves only LoRA tensors."""
    make_adapter(tiny_model("llama"), tmp_path / "nobias", seed=2, target_modules=["q_proj"],
                 bias="lora_only")
    assert json.loads((tmp_path / "nobias" / "adapter_config.json").read_text())["bias"]
    _served_equals_peft(tmp_path, "nobias", tmp_path / "nobias")
    # A trained bias is a tensor the blend cannot carry: refused, naming it.
    tensors = load_file(tmp_path / "nobias" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, tmp_path / "nobias" / "adapter_model.safetensors")
    assert "trained bias" in _refusal(tmp_path, "nobias")


def test_named_subfolder_save_is_found_and_served(tmp_path):
    """Defect 7: save_pretrained of an adapter not called "default" writes <dir>/<name>/."""
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["v_proj"],
                                                           init_lora_weights=False),
                           adapter_name="mine")
    model.save_pretrained(tmp_path / "named")
    assert (tmp_path / "named" / "mine" / "adapter_config.json").is_file()
    assert list_store(tmp_path) == ["named"]
    _served_equals_peft(tmp_path, "named", tmp_path / "named" / "mine")


def test_two_named_subfolders_are_refused_by_name(tmp_path):
    for name in ("a", "b"):
        make_adapter(tiny_model("llama"), tmp_path / "pair" / name, seed=3,
                     target_modules=["v_proj"])
    assert list_store(tmp_path) == ["pair"]
    assert "several named PEFT saves (a, b)" in _refusal(tmp_path, "pair")


@pytest.mark.parametrize(("fields", "named"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),  # defect 6
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"some_future_field": {"x": 1}}, "some_future_field"),
])
def test_forward_changing_config_fields_are_refused_by_name(tmp_path, fields, named):
    make_adapter(tiny_model("llama"), tmp_path / "odd", seed=4, target_modules=["q_proj"])
    path = tmp_path / "odd" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    assert named in _refusal(tmp_path, "odd")


def test_real_alora_is_refused_by_name(tmp_path):
    """Defect 6, with an aLoRA made by PEFT."""
    make_adapter(tiny_model("llama"), tmp_path / "alora", seed=5, target_modules=["q_proj"],
                 alora_invocation_tokens=[7, 8])
    assert "activated LoRA" in _refusal(tmp_path, "alora")


def test_embedding_lora_is_refused_by_name(tmp_path):
    make_adapter(tiny_model("llama"), tmp_path / "emb", seed=6,
                 target_modules=["q_proj", "embed_tokens"])
    assert "embedding layer" in _refusal(tmp_path, "emb")


def test_unmatched_target_name_is_a_warning(caplog):
    """Defect 3: a configured name matching no layer used to be dropped without a word."""
    with caplog.at_level(logging.WARNING):
        layers = install_blended_layers(tiny_model("gpt2"), ["c_attn", "q_proj"],
                                        BlendContext(), 1)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"c_attn"}
    assert "'q_proj'" in caplog.text
