"""The disk tier: every adapter of a store directory, validated from its config and header.

A store may hold thousands of adapters. At start-up each one is checked from its
`adapter_config.json` and its safetensors header (names, dtypes, shapes) without reading a
tensor; a bad one is refused with the registry's named error and the others are served. The
tensors are read later, when an adapter is first needed (`load`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adapters.errors import AdapterError, AdapterNotFoundError, IncompatibleAdapterError
from adapters.registry import AdapterSpec, LoraAdapter, inspect_adapter, list_store, load_adapter

log = logging.getLogger(__name__)


class AdapterStore:
    """The servable adapters of one store directory, and those it refused.

    Args:
        root: the store directory (one sub-directory per adapter).
        base_shapes: `{module name: (out, in)}` of the base model's targetable layers.
        base_weight: a targetable layer's base weight, [out, in], by module name.
        dtype: what tensors are cast to when loaded.
        on_refuse: called with an adapter id when loading finds its values bad (whoever
            routes to it must stop).
    """

    def __init__(
        self, root: Path, base_shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype,
        on_refuse: Callable[[str], None] | None = None,
        base_weight: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.base_weight = base_weight  # [out, in] of a module, to check saved base copies
        self._on_refuse = on_refuse or (lambda _id: None)
        self.base_shapes = base_shapes
        self.dtype = dtype
        self._specs: dict[str, AdapterSpec] = {}
        self.refused: dict[str, str] = {}  # adapter id -> why it is not served
        self._lock = threading.Lock()

    def scan(self, ids: list[str] | None = None, show_progress: bool = False) -> None:
        """Validate `ids` (every adapter directory of the store when None), keep the good."""
        candidates = ids if ids is not None else list_store(self.root)
        specs, refused = {}, {}
        for adapter_id in tqdm(candidates, desc="Checking adapters", unit="adapter",
                               disable=not show_progress):
            try:
                specs[adapter_id] = inspect_adapter(self.root, adapter_id, self.base_shapes,
                                                    self.dtype, self.base_weight)
            except AdapterError as exc:
                refused[adapter_id] = f"{type(exc).__name__}: {exc}"
                log.warning("adapter %r refused: %s", adapter_id, exc)
        with self._lock:
            self._specs, self.refused = specs, refused
        log.info("adapter store: %d servable, %d refused", len(specs), len(refused))

    # --- the catalog ----------------------------------------------------------------------
    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def ids(self) -> list[str]:
        """Servable adapters, in store order."""
        return list(self._specs)

    def spec(self, adapter_id: str) -> AdapterSpec:
        try:
            return self._specs[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the store") from None

    def add(self, adapter_id: str) -> AdapterSpec:
        """Validate and add one adapter (an admin registered it live)."""
        spec = inspect_adapter(self.root, adapter_id, self.base_shapes, self.dtype,
                               self.base_weight)
        with self._lock:
            self._specs = {**self._specs, adapter_id: spec}
            self.refused.pop(adapter_id, None)
        return spec

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            if adapter_id not in self._specs:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            self._specs = {k: v for k, v in self._specs.items() if k != adapter_id}

    def refuse(self, adapter_id: str, reason: str) -> None:
        """Stop serving an adapter whose tensors turned out to be bad."""
        with self._lock:
            self._specs = {k: v for k, v in self._specs.items() if k != adapter_id}
            self.refused[adapter_id] = reason
        log.warning("adapter %r refused: %s", adapter_id, reason)
        self._on_refuse(adapter_id)

    # --- tensors --------------------------------------------------------------------------
    def load(self, adapter_id: str) -> LoraAdapter:
        """Read an adapter's tensors from disk. Bad values refuse it from then on."""
        spec = self.spec(adapter_id)
        try:
            return load_adapter(self.root, adapter_id, self.base_shapes, self.dtype, spec=spec)
        except IncompatibleAdapterError as exc:
            self.refuse(adapter_id, f"{type(exc).__name__}: {exc}")
            raise


class HostAdapters(Mapping[str, LoraAdapter]):
    """The store's adapters as a read-only mapping whose values come from `get` (the host
    tier), for code that reads adapters' tensors now and then (merge methods, previews)."""

    def __init__(self, store: AdapterStore, get: Callable[[str], LoraAdapter]) -> None:
        self._store = store
        self._get = get

    def __getitem__(self, adapter_id: str) -> LoraAdapter:
        if adapter_id not in self._store:
            raise KeyError(adapter_id)
        return self._get(adapter_id)

    def __iter__(self):
        return iter(self._store.ids())

    def __len__(self) -> int:
        return len(self._store)
