"""Module inputs on each task's exemplars, for TE-Merging's neuron relevance scores."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.engine.blended_lora import BlendedLoRALinear


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
