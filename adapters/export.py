"""Write a merged (virtual) adapter as a plain PEFT LoRA directory, for static merges."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.registry import CONFIG_FILE, EXEMPLARS_FILE, WEIGHTS_FILE
from adapters.virtual import VirtualAdapter


def write_peft_adapter(
    virtual: VirtualAdapter,
    out: Path,
    base_model: str,
    exemplars: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save `virtual` so that PEFT (and our registry) load it as an ordinary LoRA adapter.

    Every module is stored at one rank r (the largest; smaller ones are zero-padded, which is
    exact) with lora_alpha = r, so PEFT's scaling is 1 and `B @ A` is the merged delta.

    Args:
        virtual: a merge whose modules all hold factors (SVD or exact low-rank storage).
        out: directory to create (or overwrite files in).
        base_model: recorded as `base_model_name_or_path`.
        exemplars: router exemplars to ship with the adapter (e.g. the merged tasks').

    Returns:
        `out`.
    """
    dense = [name for name, m in virtual.modules.items() if m.A is None]
    if dense:
        raise ValueError(f"modules stored densely cannot be exported as LoRA: {dense[:3]}")
    rank = max(m.A.shape[0] for m in virtual.modules.values())  # type: ignore[union-attr]
    tensors = {}
    for name, module in virtual.modules.items():
        A, B = module.A, module.B
        assert A is not None
        pad = rank - A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.nn.functional.pad(
            A, (0, 0, 0, pad)).to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.nn.functional.pad(
            B, (0, pad)).to(dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in virtual.modules}),
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / EXEMPLARS_FILE).write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in exemplars), encoding="utf-8"
    )
    return out
