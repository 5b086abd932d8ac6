"""Load the resident base model and tokenizer, on CUDA when present."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.settings import Settings

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DYNAMERGE_DEVICE=cuda but no CUDA device is available")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # CPUs here have no native bf16: fp32 is both faster and exact on them.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


def base_model_path(settings: Settings) -> Path:
    if settings.base_model is not None:
        return settings.base_model
    from adapters.zoo.base import ensure_demo_base

    return ensure_demo_base(settings.cache_dir)


def load_base_model(
    settings: Settings,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.device, torch.dtype]:
    """The base model in eval mode on its device, and its tokenizer."""
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    path = base_model_path(settings)
    log.info("loading base model %s on %s (%s)", path, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    if tokenizer.chat_template is None:
        # A base checkpoint (GPT-2, OPT, Pythia, Llama-2 base): completions need no template.
        log.warning("the tokenizer of %s has no chat template: /v1/completions only, chat "
                    "requests are refused with 400", path.name)
    return model, tokenizer, device, dtype
