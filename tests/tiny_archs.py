"""Tiny random checkpoints (2 layers) of common architectures, and PEFT adapters for them made
by PEFT itself, for tests that compare the blended layers with PEFT's forward."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

_SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# model_type -> (config overrides, LoRA targets PEFT users set for it)
ARCHS: dict[str, tuple[dict, list[str]]] = {
    "llama": ({}, ["q_proj", "v_proj", "down_proj"]),
    "qwen2": ({}, ["q_proj", "k_proj", "o_proj", "up_proj"]),
    "qwen3": ({"head_dim": 8}, ["q_proj", "v_proj", "gate_proj"]),
    "mistral": ({"sliding_window": 4}, ["q_proj", "v_proj", "down_proj"]),
    "gemma2": ({"head_dim": 8, "sliding_window": 4}, ["q_proj", "o_proj", "up_proj"]),
    "gemma3_text": ({"head_dim": 8, "sliding_window": 4}, ["q_proj", "v_proj", "down_proj"]),
    "phi3": ({}, ["qkv_proj", "gate_up_proj", "o_proj"]),
    "gpt_neox": ({"num_attention_heads": 4}, ["query_key_value", "dense", "dense_4h_to_h"]),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, ["q_proj", "v_proj", "fc1", "fc2"]),
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
             ["c_attn", "c_proj", "c_fc"]),
}


def tiny_model(model_type: str, seed: int = 0, **extra: object) -> torch.nn.Module:
    overrides, _ = ARCHS[model_type]
    config = AutoConfig.for_model(model_type, **{**_SMALL, **overrides, **extra})
    if model_type == "opt":
        config.ffn_dim = 64
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(model_type: str, directory: Path, seed: int = 0, **extra: object) -> Path:
    tiny_model(model_type, seed, **extra).save_pretrained(directory)
    return directory


def make_adapter(base: torch.nn.Module, directory: Path, seed: int, **config) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved by PEFT's `save_pretrained`."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    peft_model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():  # make the delta large enough to change greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(5.0)
    peft_model.save_pretrained(directory)
    peft_model.unload()
    return directory
