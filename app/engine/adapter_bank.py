"""Adapters resident on the device: which adapter lives in which slot of the blended layers."""

from __future__ import annotations

from collections.abc import Mapping

from adapters.errors import AdapterCapacityError, AdapterNotFoundError
from adapters.registry import LoraAdapter
from adapters.virtual import VirtualAdapter
from app.engine.blended_lora import BlendedLoRALinear


class AdapterBank:
    """Writes validated adapters into free slots of every blended layer, and frees them.

    Not thread-safe on its own: the engine calls it under its model lock, so no forward pass
    ever sees a half-written adapter.
    """

    def __init__(self, layers: Mapping[str, BlendedLoRALinear], num_slots: int) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.adapters: dict[str, LoraAdapter] = {}
        self.virtual: dict[str, VirtualAdapter] = {}  # merged results of non-linear methods
        self._slot_of: dict[str, int] = {}

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        """`{module name: (out, in)}` of every layer an adapter may target."""
        return {n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()}

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._slot_of

    def ids(self) -> list[str]:
        """Real adapters, in load order (virtual ones are not listed)."""
        return list(self.adapters)

    def slot_of(self, adapter_id: str) -> int:
        try:
            return self._slot_of[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded") from None

    def add(self, adapter: LoraAdapter) -> int:
        """Place `adapter` in a free slot (or its own, when replacing). Returns the slot."""
        slot = self._slot_of[adapter.id] if adapter.id in self._slot_of else self._free_slot()
        for layer in self.layers.values():
            layer.clear_slot(slot)
        for name, module in adapter.modules.items():
            self.layers[name].set_slot(slot, module.A, module.B, module.scaling)
        self._slot_of[adapter.id] = slot
        self.adapters[adapter.id] = adapter
        return slot

    def add_virtual(self, adapter: VirtualAdapter) -> int:
        """Place a merged (virtual) adapter in a free slot, beside the stacks."""
        slot = self._free_slot()
        for name, module in adapter.modules.items():
            self.layers[name].set_side(slot, module.A, module.B)
        self._slot_of[adapter.id] = slot
        self.virtual[adapter.id] = adapter
        return slot

    def _free_slot(self) -> int:
        taken = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in taken:
                return slot
        raise AdapterCapacityError(
            f"all {self.num_slots} adapter slots are taken (adapters and cached merges); "
            "raise DYNAMERGE_MAX_ADAPTERS or delete an adapter"
        )

    def remove(self, adapter_id: str) -> None:
        slot = self.slot_of(adapter_id)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        del self._slot_of[adapter_id]
        self.adapters.pop(adapter_id, None)
        self.virtual.pop(adapter_id, None)
