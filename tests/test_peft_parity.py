"""Our reading of PEFT's config against PEFT's own `LoraModel`, on configs where a hand-made
matcher goes wrong (defect 1 of issue 22: alpha_pattern keys matched as plain suffixes, last
match winning). For every module of a tiny model, which ones are targeted, their rank and their
scaling must be PEFT's exactly: zero differences, floats compared with ==."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from adapters.registry import module_setting
from app.engine.blended_lora import is_linear_like
from tests.tiny_archs import tiny_model

TRICKY = {
    "regex_alpha_keys": dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                             alpha_pattern={"^model.layers.0.self_attn.q_proj": 64,
                                            "mlp.*_proj": 1}),
    "overlapping_first_wins": dict(target_modules=["q_proj", "k_proj"],
                                   alpha_pattern={"layers.0.self_attn.q_proj": 1,
                                                  "q_proj": 64}),
    "rank_pattern_regex": dict(target_modules=["q_proj", "o_proj", "gate_proj"],
                               rank_pattern={r"layers\.1\..*": 2, "o_proj": 6},
                               alpha_pattern={"o_proj": 3}),
    "rslora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True),
    "rslora_rank_pattern": dict(target_modules=["q_proj", "down_proj"], r=8, lora_alpha=16,
                                use_rslora=True, rank_pattern={"down_proj": 2}),
    "target_regex_string": dict(target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj"),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"],
                                layers_to_transform=[1], layers_pattern="layers"),
    "layers_to_transform_int": dict(target_modules=["v_proj"], layers_to_transform=0),
    "exclude_modules": dict(target_modules=["q_proj", "k_proj", "v_proj"],
                            exclude_modules=["k_proj"]),
    "all_linear": dict(target_modules="all-linear", alpha_pattern={"gate_proj": 5}),
}


def _peft_settings(config: LoraConfig) -> tuple[dict, dict]:
    model = get_peft_model(tiny_model("llama"), config)
    inner = model.base_model.model
    theirs = {name: (module.r["default"], module.scaling["default"])
              for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    return theirs, model.peft_config["default"].to_dict()


@pytest.mark.parametrize("name", list(TRICKY))
def test_scaling_equals_peft(name):
    theirs, saved = _peft_settings(LoraConfig(**{"r": 4, "lora_alpha": 8, **TRICKY[name]}))
    assert theirs, "PEFT must target something"
    ours = {}
    for module_name, module in tiny_model("llama").named_modules():
        if is_linear_like(module) and module_name != "lm_head":
            setting = module_setting(saved, module_name)
            if setting is not None:
                ours[module_name] = setting
    assert ours == theirs


def test_saved_adapter_loads_with_peft_scaling(tmp_path):
    """The same through a directory PEFT saved: what the registry loads is PEFT's scaling."""
    from adapters.registry import inspect_adapter
    from tests.tiny_archs import make_adapter

    config = TRICKY["regex_alpha_keys"]
    make_adapter(tiny_model("llama"), tmp_path / "tricky", seed=3, **config)
    theirs, _ = _peft_settings(LoraConfig(**{"r": 4, "lora_alpha": 8, **config}))
    shapes = {name: tuple(m.weight.shape) for name, m in tiny_model("llama").named_modules()
              if is_linear_like(m)}
    spec = inspect_adapter(tmp_path, "tricky", shapes)
    assert dict(spec.modules) == theirs
    assert spec.modules["model.layers.0.self_attn.q_proj"][1] == 16.0  # 64 / 4, not 8 / 4
