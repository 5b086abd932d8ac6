"""The device tier: which adapter lives in which slot of the blended layers, who uses it, and
which to evict.

Two pools of slots: `num_adapters` for the store's adapters and `num_virtual` for merged
(virtual) adapters of non-linear methods, each an LRU with a reference count per slot. A slot
whose count is above zero (a running or admitted request uses it, or the adapter is pinned by
the settings) is never evicted.

Not thread-safe on its own: the residency manager calls it under its lock, and writes tensors
under the engine's model lock as well, so no forward pass sees a half-written slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from adapters.errors import IncompatibleAdapterError
from adapters.registry import LoraAdapter
from adapters.virtual import VirtualAdapter
from app.engine.blended_lora import BlendedLoRALinear

Pool = Literal["adapter", "virtual"]


@dataclass
class _Slot:
    adapter_id: str
    refs: int = 0
    retired: bool = False  # leaves as soon as nobody uses it


class DeviceSlots:
    """Slots of every blended layer: `[0, num_adapters)` for adapters, then virtual ones."""

    def __init__(
        self, layers: Mapping[str, BlendedLoRALinear], num_adapters: int, num_virtual: int
    ) -> None:
        self.layers = layers
        self.num_adapters = num_adapters
        self.num_virtual = num_virtual
        self._slots: dict[int, _Slot] = {}
        self._slot_of: dict[str, int] = {}
        self._lru: dict[Pool, OrderedDict[int, None]] = {"adapter": OrderedDict(),
                                                         "virtual": OrderedDict()}

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        """`{module name: (out, in)}` of every layer an adapter may target."""
        return {n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()}

    # --- reading --------------------------------------------------------------------------
    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._slot_of

    def refs(self, adapter_id: str) -> int:
        slot = self._slot_of.get(adapter_id)
        return 0 if slot is None else self._slots[slot].refs

    def resident(self, pool: Pool | None = None) -> list[str]:
        """Adapters in slots, least recently used first."""
        pools = [pool] if pool is not None else ["adapter", "virtual"]
        return [self._slots[s].adapter_id for p in pools for s in self._lru[p]]

    def available(self, pool: Pool) -> int:
        """Slots of `pool` that are free or hold an adapter nobody uses."""
        used = sum(1 for s in self._lru[pool] if self._slots[s].refs > 0)
        return self._size(pool) - used

    # --- changing -------------------------------------------------------------------------
    def claim(self, pool: Pool) -> tuple[int, str | None]:
        """A slot for a new adapter: a free one, else the least recently used idle one.

        Returns:
            The slot (cleared) and the id of the adapter evicted from it, if any.

        Raises:
            RuntimeError: every slot of the pool is in use (check `available` first).
        """
        taken = set(self._lru[pool])
        first = 0 if pool == "adapter" else self.num_adapters
        for slot in range(first, first + self._size(pool)):
            if slot not in taken:
                return slot, None
        for slot in self._lru[pool]:
            if self._slots[slot].refs == 0:
                evicted = self._slots[slot].adapter_id
                self._free(slot)
                return slot, evicted
        raise RuntimeError(f"every {pool} slot is in use")

    def write(self, slot: int, adapter: LoraAdapter | VirtualAdapter) -> None:
        """Put `adapter`'s factors into a claimed slot (under the model lock).

        Raises:
            IncompatibleAdapterError: a factor holds NaN or inf. A batch multiplies every
                slot it uses by every row's weight, zeros included, and 0 * NaN is NaN: one
                such slot would poison every row it shares a forward pass with.
        """
        for name, module in adapter.modules.items():
            for factor in (module.A, module.B):
                if factor is not None and not bool(torch.isfinite(factor).all()):
                    raise IncompatibleAdapterError(
                        f"adapter {adapter.id!r}: {name} holds NaN or inf")
        for layer in self.layers.values():
            layer.clear_slot(slot)
        if isinstance(adapter, VirtualAdapter):
            for name, module in adapter.modules.items():
                self.layers[name].set_side(slot, module.A, module.B)
        else:
            for name, module in adapter.modules.items():
                self.layers[name].set_slot(slot, module.A, module.B, module.scaling)
        pool: Pool = "virtual" if slot >= self.num_adapters else "adapter"
        self._slots[slot] = _Slot(adapter.id)
        self._slot_of[adapter.id] = slot
        self._lru[pool][slot] = None

    def pin(self, adapter_id: str) -> int:
        """One more user of a resident adapter; returns its slot (now most recently used)."""
        slot = self._slot_of[adapter_id]
        self._slots[slot].refs += 1
        self._lru[self._pool_of(slot)].move_to_end(slot)
        return slot

    def unpin(self, slot: int) -> str | None:
        """One user less. Returns the adapter id if that freed a retired slot."""
        entry = self._slots[slot]
        entry.refs -= 1
        if entry.refs < 0:
            raise RuntimeError(f"slot {slot} ({entry.adapter_id}) was released more than pinned")
        if entry.refs == 0 and entry.retired:
            self._free(slot)
            return entry.adapter_id
        return None

    def retire(self, adapter_id: str) -> bool:
        """Free the adapter's slot now if nobody uses it, else when its last user leaves.
        Returns True if it was freed now (or was not resident)."""
        slot = self._slot_of.get(adapter_id)
        if slot is None:
            return True
        if self._slots[slot].refs == 0:
            self._free(slot)
            return True
        self._slots[slot].retired = True
        return False

    def _free(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        entry = self._slots.pop(slot)
        self._slot_of.pop(entry.adapter_id, None)
        self._lru[self._pool_of(slot)].pop(slot, None)

    def _pool_of(self, slot: int) -> Pool:
        return "virtual" if slot >= self.num_adapters else "adapter"

    def _size(self, pool: Pool) -> int:
        return self.num_adapters if pool == "adapter" else self.num_virtual
