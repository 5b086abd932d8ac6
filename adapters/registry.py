"""Load PEFT LoRA adapter directories from a store and validate them against the base model.

Store layout (one directory per adapter, the directory name is the adapter id)::

    <store>/<adapter_id>/adapter_config.json        PEFT LoraConfig
    <store>/<adapter_id>/adapter_model.safetensors  lora_A / lora_B weights (safetensors only)
    <store>/<adapter_id>/exemplars.jsonl            {"text": ...} per line, for the router
    <store>/<adapter_id>/eval.jsonl                 optional held-out {"prompt", "answer"} pairs

`inspect_adapter` checks everything a file's header can tell (config, names, dtypes, shapes)
without reading a tensor, which is what a store of thousands of adapters needs at start-up;
`load_adapter` then reads the tensors and checks their values. Nothing reaches the engine
before it is checked, so a bad adapter never leaves the loaded set half-changed. Messages name
adapters and modules, never a server path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.errors import (
    AdapterNotFoundError,
    IncompatibleAdapterError,
    UnsafeAdapterError,
)

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Weights in these formats are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
EXEMPLARS_FILE = "exemplars.jsonl"
_PEFT_PREFIX = "base_model.model."
_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")
_RESERVED_IDS = frozenset({"auto", "base"})


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-targeted linear layer of one adapter: delta = scaling * B @ A."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The true task vector of this module, [out, in], in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter, ready to be written into the engine's slots."""

    id: str
    path: Path
    modules: Mapping[str, LoraModule]  # base module name (e.g. model.layers.0.self_attn.q_proj)
    exemplars: tuple[str, ...]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def nbytes(self) -> int:
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values())


def list_store(store: Path) -> list[str]:
    """Adapter ids present in the store (directories holding an adapter config), sorted."""
    if not store.is_dir():
        return []
    return sorted(
        p.name
        for p in store.iterdir()
        if p.is_dir() and (p / CONFIG_FILE).is_file() and ADAPTER_ID_PATTERN.match(p.name)
    )


def resolve_adapter_dir(store: Path, adapter_id: str) -> Path:
    """The directory of `adapter_id` inside `store`, refusing anything that escapes it."""
    if adapter_id in _RESERVED_IDS or not ADAPTER_ID_PATTERN.match(adapter_id):
        raise UnsafeAdapterError(
            f"invalid adapter id {adapter_id!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64), not 'auto' or 'base'"
        )
    root = store.resolve()
    path = (store / adapter_id).resolve()  # resolve() follows symlinks, so they cannot escape
    if not path.is_relative_to(root) or path == root:
        raise UnsafeAdapterError(f"adapter {adapter_id!r} resolves outside the adapter store")
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter {adapter_id!r} not found in the adapter store")
    return path


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter validated from its config and its safetensors header, no tensor read: what
    the disk tier knows of an adapter, enough to route to it and to size it."""

    id: str
    path: Path
    modules: Mapping[str, tuple[int, float]]  # module name -> (rank, scaling)
    keys: Mapping[str, tuple[str, str]]  # module name -> (lora_A key, lora_B key) in the file
    exemplars: tuple[str, ...]
    nbytes: int  # of the factors once loaded (in the dtype they are loaded as)

    @property
    def rank(self) -> int:
        return max(rank for rank, _ in self.modules.values())


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def inspect_adapter(
    store: Path,
    adapter_id: str,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype = torch.float32,
) -> AdapterSpec:
    """Validate one adapter directory without reading its tensors.

    Everything but the values is checked: the id, pickles, the config (plain LoRA only), the
    tensor names, dtypes and shapes against the base model (from the safetensors header).
    NaN and inf can only be seen once the tensors are read, by `load_adapter`.

    Raises:
        AdapterError: a subclass naming the culprit.
    """
    path = resolve_adapter_dir(store, adapter_id)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeAdapterError(
            f"adapter {adapter_id!r} contains pickle weights ({', '.join(pickles)}); "
            f"only {WEIGHTS_FILE} is loaded"
        )
    config = _read_config(path, adapter_id)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                      for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r}: {WEIGHTS_FILE} is not a valid safetensors file"
        ) from exc
    keys = _group_keys(header, adapter_id)
    modules, nbytes = {}, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, (a_key, b_key) in keys.items():
        (a_dtype, a_shape), (b_dtype, b_shape) = header[a_key], header[b_key]
        for key, kind in ((a_key, a_dtype), (b_key, b_dtype)):
            if kind not in _DTYPE_BYTES:
                raise IncompatibleAdapterError(
                    f"adapter {adapter_id!r}: {key} is {kind}, expected a float type"
                )
        rank = _check_shapes(adapter_id, name, a_shape, b_shape, base_shapes)
        modules[name] = (rank, _scaling(config, name, rank))
        nbytes += (math.prod(a_shape) + math.prod(b_shape)) * itemsize
    return AdapterSpec(
        id=adapter_id, path=path, modules=modules, keys=keys,
        exemplars=read_exemplars(path / EXEMPLARS_FILE), nbytes=nbytes,
    )


def load_adapter(
    store: Path,
    adapter_id: str,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    spec: AdapterSpec | None = None,
) -> LoraAdapter:
    """Load and validate one adapter directory.

    Args:
        store: the adapter store; the adapter must live directly inside it.
        adapter_id: directory name of the adapter.
        base_shapes: `{module name: (out_features, in_features)}` of every linear layer of the
            base model that adapters may target.
        dtype: dtype the factors are cast to.
        spec: the adapter's `inspect_adapter` result, when the caller has it already.

    Returns:
        The validated adapter. Raises an `AdapterError` subclass naming the culprit otherwise.
    """
    spec = spec or inspect_adapter(store, adapter_id, base_shapes, dtype)
    modules = {}
    with safe_open(str(spec.path / WEIGHTS_FILE), framework="pt") as f:
        for name, (a_key, b_key) in spec.keys.items():
            a, b = f.get_tensor(a_key), f.get_tensor(b_key)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise IncompatibleAdapterError(f"adapter {adapter_id!r}: {name} holds NaN or inf")
            _, scaling = spec.modules[name]
            modules[name] = LoraModule(A=a.to(dtype), B=b.to(dtype), scaling=scaling)
    return LoraAdapter(id=adapter_id, path=spec.path, modules=modules, exemplars=spec.exemplars)


def read_exemplars(path: Path) -> tuple[str, ...]:
    """Exemplar prompts, one JSON object with a "text" field per line; missing file -> ()."""
    if not path.is_file():
        return ()
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise IncompatibleAdapterError(
                # The adapter and file name only: a server path must not reach a client.
                f"{path.parent.name}/{path.name}: line {number} is not a JSON object with a "
                "'text' field"
            ) from exc
    return tuple(texts)


def _read_config(path: Path, adapter_id: str) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} has no {CONFIG_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r}: {CONFIG_FILE} is not JSON"
        ) from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} is {config.get('peft_type')}, only plain LoRA is supported"
        )
    if config.get("use_dora"):
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} uses DoRA, which is not supported")
    if config.get("modules_to_save"):
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} trains full modules ({config['modules_to_save']}); "
            "only LoRA deltas can be blended"
        )
    if config.get("bias", "none") != "none":
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} trains biases, not supported")
    return config


def _group_keys(
    header: Mapping[str, object], adapter_id: str
) -> dict[str, tuple[str, str]]:
    """`{module: (lora_A key, lora_B key)}` from the tensor names of a PEFT adapter file."""
    found: dict[str, dict[str, str]] = {}
    for key in header:
        match = _KEY_PATTERN.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r}: unexpected tensor {key!r} (only lora_A/lora_B weights)"
            )
        found.setdefault(match["module"], {})[match["factor"]] = key
    if not found:
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} holds no LoRA weights")
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r}: {module} lacks lora_{'B' if 'A' in parts else 'A'}"
            )
        pairs[module] = (parts["A"], parts["B"])
    return pairs


def _check_shapes(
    adapter_id: str,
    name: str,
    a: tuple[int, ...],
    b: tuple[int, ...],
    base_shapes: Mapping[str, tuple[int, int]],
) -> int:
    """The module's rank, once its factor shapes are known to fit the base layer."""
    if name not in base_shapes:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} targets {name}, which is not a linear layer of the base model"
        )
    out_features, in_features = base_shapes[name]
    rank = a[0] if a else 0
    if len(a) != 2 or len(b) != 2 or a[1] != in_features or b != (out_features, rank) or rank < 1:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r}: lora_A of {name} is {'x'.join(map(str, a))} and "
            f"lora_B is {'x'.join(map(str, b))}, base expects {rank}x{in_features} and "
            f"{out_features}x{rank}"
        )
    return rank


def _scaling(config: Mapping, module: str, rank: int) -> float:
    """PEFT's scaling for one module, honouring alpha_pattern and rsLoRA."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
