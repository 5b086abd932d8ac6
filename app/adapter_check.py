"""`dynamerge adapters check DIR`: validate a store, or one adapter, against a base model
without starting the server, exactly as the server's start-up does (same layers, same store
checks), and say per adapter whether it is served, or refused and why."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapters.registry import CONFIG_FILE, list_store
from adapters.store import AdapterStore
from app.engine.blended_lora import BlendContext, install_blended_layers


def check_adapters(directory: Path, base: Path, targets: list[str] | None) -> tuple[str, bool]:
    """The report as text, and whether every adapter is served.

    `directory` is one adapter directory when it holds an adapter config itself, else a store
    (one sub-directory per adapter; PEFT's named-subfolder saves count as adapters)."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        root, ids = directory.parent, [directory.name]
    else:
        root, ids = directory, list_store(directory)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    layers = install_blended_layers(model, targets, BlendContext(), num_slots=1)
    store = AdapterStore(root, {n: (m.out_features, m.in_features) for n, m in layers.items()},
                         torch.float32, base_weight=lambda name: layers[name].weight)
    store.scan(ids)
    lines = []
    for adapter_id in ids:
        if adapter_id in store:
            spec = store.spec(adapter_id)
            groups: dict[str, set[tuple[int, float]]] = defaultdict(set)
            for module, setting in spec.modules.items():
                groups[module.rsplit(".", 1)[-1]].add(setting)
            lines.append(f"{adapter_id}: served ({len(spec.modules)} modules)")
            for group, settings in sorted(groups.items()):
                shown = ", ".join(f"r={r} scaling={s:g}" for r, s in sorted(settings))
                lines.append(f"    {group:<20} {shown}")
        else:
            lines.append(f"{adapter_id}: refused: {store.refused.get(adapter_id, 'not found')}")
    if not ids:
        lines.append(f"no adapter directories in {directory.name}")
    return "\n".join(lines), bool(ids) and len(store) == len(ids)
