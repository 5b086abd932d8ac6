"""Bad adapters are refused with a clear error, and the loaded set is unchanged afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.errors import (
    AdapterNotFoundError,
    IncompatibleAdapterError,
    UnsafeAdapterError,
)
from adapters.registry import list_store, load_adapter


@pytest.fixture
def store_copy(micro_zoo, tmp_path):
    """A private copy of the micro store that a test may vandalise."""
    store = tmp_path / "store"
    shutil.copytree(micro_zoo.store_dir, store)
    return store


def _shapes(engine):
    return engine.slots.base_shapes()


def _register_fails(engine, adapter_id, error, match):
    before = (engine.models(), engine.router.index.task_ids)
    with pytest.raises(error, match=match):
        engine.register_adapter(adapter_id)
    assert (engine.models(), engine.router.index.task_ids) == before


def test_loads_scaling_and_exemplars(micro_zoo, micro_engine):
    travel = load_adapter(micro_zoo.store_dir, "travel", _shapes(micro_engine))
    assert travel.rank == 2 and len(travel.exemplars) == 50
    module = travel.modules["model.layers.0.mlp.up_proj"]
    assert module.scaling == pytest.approx(4 / 2**0.5)  # rsLoRA: alpha / sqrt(r)
    math_ = load_adapter(micro_zoo.store_dir, "math", _shapes(micro_engine))
    assert math_.modules["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(8 / 4)


def test_unknown_adapter(micro_engine):
    _register_fails(micro_engine, "does-not-exist", AdapterNotFoundError, "not found")


@pytest.mark.parametrize("adapter_id", ["../adapters", "a/../../etc", "..", "auto", "base", ""])
def test_ids_escaping_the_store_are_refused(micro_engine, adapter_id):
    _register_fails(micro_engine, adapter_id, UnsafeAdapterError, "invalid adapter id")


def test_symlink_escaping_the_store_is_refused(micro_zoo, store_copy, tmp_path, micro_engine):
    outside = tmp_path / "outside"
    shutil.copytree(micro_zoo.store_dir / "math", outside)
    (store_copy / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeAdapterError, match="outside the adapter store"):
        load_adapter(store_copy, "sneaky", _shapes(micro_engine))


def test_pickle_weights_are_refused(micro_zoo, micro_engine):
    bad = micro_zoo.store_dir / "pickled"
    shutil.copytree(micro_zoo.store_dir / "math", bad)
    try:
        torch.save({"x": torch.zeros(1)}, bad / "adapter_model.bin")
        _register_fails(micro_engine, "pickled", UnsafeAdapterError, r"pickle weights \(adapter")
    finally:
        shutil.rmtree(bad)


def test_wrong_shapes_are_refused_naming_the_module(micro_zoo, micro_engine):
    bad = micro_zoo.store_dir / "misshapen"
    shutil.copytree(micro_zoo.store_dir / "math", bad)
    try:
        weights = load_file(bad / "adapter_model.safetensors")
        key = next(k for k in weights if "layers.1.self_attn.q_proj.lora_B" in k)
        weights[key] = torch.zeros(7, weights[key].shape[1])
        save_file(weights, bad / "adapter_model.safetensors")
        _register_fails(micro_engine, "misshapen", IncompatibleAdapterError,
                        r"'misshapen': lora_A of model.layers.1.self_attn.q_proj .* base expects")
    finally:
        shutil.rmtree(bad)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only plain LoRA"),
        ({"modules_to_save": ["lm_head"]}, "trains full modules"),
    ],
)
def test_unsupported_configs_are_refused(store_copy, micro_engine, change, match):
    path = store_copy / "math" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(IncompatibleAdapterError, match=match):
        load_adapter(store_copy, "math", _shapes(micro_engine))


def test_unknown_target_module_is_refused(store_copy, micro_engine):
    weights = load_file(store_copy / "math" / "adapter_model.safetensors")
    weights = {k.replace("layers.0.", "layers.9."): v for k, v in weights.items()}
    save_file(weights, store_copy / "math" / "adapter_model.safetensors")
    with pytest.raises(IncompatibleAdapterError, match=r"layers\.9\..* not a linear layer"):
        load_adapter(store_copy, "math", _shapes(micro_engine))


def test_list_store_skips_non_adapters(store_copy):
    (store_copy / "notes").mkdir()
    (store_copy / "README.txt").write_text("hi")
    assert list_store(store_copy) == ["cooking", "math", "travel"]
