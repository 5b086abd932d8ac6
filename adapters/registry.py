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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
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
    """Adapter ids present in the store, sorted: directories holding an adapter config, or
    holding named-subfolder saves (PEFT's `save_pretrained` of an adapter not called
    "default" writes `<dir>/<name>/adapter_config.json`)."""
    if not store.is_dir():
        return []
    return sorted(
        p.name
        for p in store.iterdir()
        if p.is_dir() and ADAPTER_ID_PATTERN.match(p.name)
        and ((p / CONFIG_FILE).is_file() or _named_saves(p))
    )


def _named_saves(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


def _weights_dir(path: Path, adapter_id: str) -> Path:
    """Where the adapter's config and weights are: the directory itself, or its one named
    subfolder. Several named subfolders are several adapters: refused, naming them."""
    if (path / CONFIG_FILE).is_file():
        return path
    saves = _named_saves(path)
    if len(saves) == 1:
        return saves[0]
    if saves:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} holds several named PEFT saves "
            f"({', '.join(p.name for p in saves)}); give each its own store directory"
        )
    return path


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
    base_weight: Callable[[str], torch.Tensor] | None = None,
) -> AdapterSpec:
    """Validate one adapter directory without reading its tensors.

    Everything but the values is checked: the id, pickles, the config (plain LoRA only), the
    tensor names, dtypes and shapes against the base model (from the safetensors header).
    NaN and inf can only be seen once the tensors are read, by `load_adapter`.

    Raises:
        AdapterError: a subclass naming the culprit.
    """
    top = resolve_adapter_dir(store, adapter_id)
    path = _weights_dir(top, adapter_id)
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
    keys, saved_base = _group_keys(header, adapter_id)
    if saved_base:
        _check_unchanged(adapter_id, weights_path, saved_base, base_shapes, base_weight)
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
        setting = module_setting(config, name)
        if setting is None:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r} holds LoRA weights for {name}, which its config does "
                "not target (target_modules, exclude_modules, layers_to_transform)"
            )
        if setting[0] != rank:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r}: {name} has rank {rank} in its weights but "
                f"{setting[0]} in its config (r / rank_pattern)"
            )
        modules[name] = (rank, setting[1])
        nbytes += (math.prod(a_shape) + math.prod(b_shape)) * itemsize
    return AdapterSpec(
        id=adapter_id, path=path, modules=modules, keys=keys,
        exemplars=read_exemplars(
            top / EXEMPLARS_FILE if (top / EXEMPLARS_FILE).is_file() else path / EXEMPLARS_FILE
        ),
        nbytes=nbytes,
    )


def load_adapter(
    store: Path,
    adapter_id: str,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    spec: AdapterSpec | None = None,
    base_weight: Callable[[str], torch.Tensor] | None = None,
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
    spec = spec or inspect_adapter(store, adapter_id, base_shapes, dtype, base_weight)
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


# PEFT LoraConfig fields (0.21) that do not change the forward of saved weights: metadata,
# initialisation, dropout (off at inference), and the fields `module_setting` reads.
_HARMLESS_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "use_rslora", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "bias", "lora_bias",  # both judged by the tensors present
})
# Fields that change the forward, and why each is refused (checked when truthy).
_REFUSED_FIELDS = {
    "use_dora": "uses DoRA (use_dora): its magnitude vector makes the layer non-linear in "
                "the delta, so it cannot be blended exactly",
    "modules_to_save": "trains full modules (modules_to_save: {value}), which replace the "
                       "base modules and cannot be blended",
    "alora_invocation_tokens": "is an activated LoRA (alora_invocation_tokens): it applies "
                               "only after its invocation tokens, which is not supported",
    "trainable_token_indices": "trains embedding rows (trainable_token_indices), not supported",
    "use_qalora": "is a QA-LoRA adapter (use_qalora), not supported",
    "layer_replication": "replicates base layers (layer_replication), not supported",
    "megatron_config": "targets Megatron parallel layers (megatron_config), not supported",
    "target_parameters": "targets parameters (target_parameters), not supported",
    "use_bdlora": "is a block-diagonal LoRA (use_bdlora), not supported",
    "arrow_config": "uses Arrow routing (arrow_config), not supported",
    "kasa_config": "uses KaSA (kasa_config), not supported",
    "velora_config": "uses VeLoRA (velora_config), not supported",
    "monteclora_config": "uses MonteCLoRA (monteclora_config), not supported",
}


def _read_config(path: Path, adapter_id: str) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} has no {CONFIG_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r}: {CONFIG_FILE} is not JSON"
        ) from exc
    if not isinstance(config, dict):
        raise IncompatibleAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} is not an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} is {config.get('peft_type')}, only plain LoRA is supported"
        )
    for field_name, reason in _REFUSED_FIELDS.items():
        value = config.get(field_name)
        if value:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r} {reason.format(value=value)}"
            )
    unknown = sorted(k for k, v in config.items()
                     if k not in _HARMLESS_FIELDS and k not in _REFUSED_FIELDS and v)
    if unknown:
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} sets PEFT config field(s) {', '.join(unknown)} that this "
            "server does not know; they may change the forward, so it is refused"
        )
    return config


def module_setting(config: Mapping, module: str) -> tuple[int, float] | None:
    """PEFT's `(r, scaling)` for `module` under an adapter config, or None when PEFT would
    not target it. Uses PEFT's own matching (`check_target_module_exists`: target_modules as
    names or a regex string, exclude_modules, layers_to_transform/layers_pattern;
    `get_pattern_key`: rank_pattern/alpha_pattern keys as regexes, first match wins), so that
    the scaling is PEFT's to the bit. With no target_modules (PEFT filled in its defaults per
    architecture at training), every module the file holds counts as targeted."""
    view = SimpleNamespace(
        target_modules=config.get("target_modules"),
        exclude_modules=config.get("exclude_modules"),
        modules_to_save=None, target_parameters=None,
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
    )
    if view.target_modules is not None and not check_target_module_exists(view, module):
        return None
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module),
                              config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return r, alpha / math.sqrt(r)
    return r, alpha / r


_BASE_COPY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


def _group_keys(
    header: Mapping[str, object], adapter_id: str
) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """`{module: (lora_A key, lora_B key)}` from the tensor names of a PEFT adapter file, and
    `{module: key}` of saved copies of base weights (PEFT's `save_embedding_layers="auto"`
    saves `<module>.base_layer.weight` of a targeted head), which must equal the base."""
    found: dict[str, dict[str, str]] = {}
    saved_base: dict[str, str] = {}
    for key in header:
        name = key.removeprefix(_PEFT_PREFIX)
        match = _KEY_PATTERN.match(name)
        if match is not None:
            found.setdefault(match["module"], {})[match["factor"]] = key
            continue
        copy = _BASE_COPY.match(name)
        if copy is not None:
            saved_base[copy["module"]] = key
            continue
        raise IncompatibleAdapterError(f"adapter {adapter_id!r}: {_unexpected(name)}")
    if not found:
        raise IncompatibleAdapterError(f"adapter {adapter_id!r} holds no LoRA weights")
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r}: {module} lacks lora_{'B' if 'A' in parts else 'A'}"
            )
        pairs[module] = (parts["A"], parts["B"])
    return pairs, saved_base


def _unexpected(name: str) -> str:
    """Why a tensor that is not a LoRA factor cannot be served, by what it is."""
    if ".lora_embedding_" in name:
        return (f"{name} is a LoRA on an embedding layer (a lookup, not a linear map), "
                "which is not supported")
    if ".lora_B" in name and name.endswith(".bias"):
        return f"{name} is a trained LoRA bias (lora_bias), which is not supported"
    if ".lora_magnitude_vector" in name:
        return f"{name} is a DoRA magnitude, which is not supported"
    if name.endswith(".bias"):
        return f"{name} is a trained bias (bias='all' or 'lora_only'), which is not supported"
    return f"unexpected tensor {name!r} (only lora_A/lora_B weights)"


def _check_unchanged(
    adapter_id: str, weights_path: Path, saved_base: Mapping[str, str],
    base_shapes: Mapping[str, tuple[int, int]],
    base_weight: Callable[[str], torch.Tensor] | None,
) -> None:
    """A saved base weight is accepted only when it equals the resident base's, bit for bit:
    a changed one is a full fine-tune of that layer, which cannot be blended."""
    for module, key in saved_base.items():
        if module not in base_shapes or base_weight is None:
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r} saves a full weight for {module}, which cannot be "
                "checked against the base model here"
            )
        with safe_open(str(weights_path), framework="pt") as f:
            saved = f.get_tensor(key)
        base = base_weight(module).detach().to("cpu")
        if saved.shape != base.shape or not torch.equal(saved.to(base.dtype), base):
            raise IncompatibleAdapterError(
                f"adapter {adapter_id!r} saves a changed weight for {module} (a full "
                "fine-tune of that layer), which cannot be blended"
            )


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
