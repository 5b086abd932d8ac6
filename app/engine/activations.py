"""Module inputs on each task's exemplars, for TE-Merging's neuron relevance scores."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.engine.blended_lora import BlendedLoRALinear

log = logging.getLogger(__name__)


@torch.inference_mode()
def collect_task_inputs(
    model: PreTrainedModel,
    layers: Mapping[str, BlendedLoRALinear],
    tokenizer: PreTrainedTokenizerBase,
    render: Callable[[str], str],
    exemplars: Mapping[str, Sequence[str]],
    per_task: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the base model (no adapter) on up to `per_task` exemplars of every task.

    Returns:
        `{module: {task: X [n_t, in]}}`: per exemplar, the module's input averaged over the
        prompt's tokens (float32, CPU). One row per exemplar keeps the memory small while
        still giving TE's mutual-information estimate one sample per prompt.
    """
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        layer.base.register_forward_hook(
            # One prompt per forward, so every row of the input is one of its tokens, whatever
            # the rank ([1, T, in], or [T, in] where a model flattens, as OPT's fc1/fc2 do).
            lambda _m, args, _out, name=name: captured[name].append(
                args[0].reshape(-1, args[0].shape[-1]).mean(0).float())
        )
        for name, layer in layers.items()
    ]
    result: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    try:
        for task, texts in exemplars.items():
            for buffer in captured.values():
                buffer.clear()
            for text in list(texts)[:per_task]:
                ids = tokenizer(render(text), add_special_tokens=False, return_tensors="pt")
                model(input_ids=ids["input_ids"].to(model.device))
            for name, rows in captured.items():
                result[name][task] = torch.stack(rows).cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return result


class TaskInputsCache:
    """TE's exemplar activations on disk, one safetensors file per task, so that a restart
    does not run the exemplars through the model again (like router_index.embedding_cache).

    The key hashes the base model's identity (its path, and the size and mtime of its weight
    files), the exemplar count and the rendered exemplar prompts, so a changed base, chat
    template or exemplar file simply misses. Writes are atomic (temp file, then rename).
    """

    def __init__(self, directory: Path, base_model: Path | str) -> None:
        self.directory = Path(directory)
        self.base_id = _base_identity(Path(base_model))

    def key(self, rendered: Sequence[str], per_task: int) -> str:
        digest = hashlib.sha256(f"{self.base_id}|{per_task}".encode())
        for text in rendered:
            digest.update(b"\x00")
            digest.update(text.encode("utf-8"))
        return digest.hexdigest()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception:  # a damaged entry: collect again (and overwrite it)
            log.warning("TE activation cache entry %s unreadable; collecting again", path.name)
            return None

    def put(self, key: str, inputs: Mapping[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({m: t.contiguous() for m, t in inputs.items()}, tmp)
            os.replace(tmp, self.directory / f"{key}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _base_identity(base: Path) -> str:
    files = sorted(base.glob("*.safetensors")) if base.is_dir() else [base]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return f"{base.resolve()}|{stats}"
