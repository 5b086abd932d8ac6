"""The contract between the HTTP service and the engine (as vLLM's `EngineClient`).

Routes use this and nothing else: they never reach into the router, the merge factory or the
slots. Every method raises typed errors (`EngineError`, `AdapterError`, `RoutingOptionError`,
`MergeParameterError`) that name the request field at fault; the API maps types to statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from adapters.merge.preview import InterferencePreview
from app.engine.stream import GenerationStream
from app.engine.types import GenerationRequest, MergeSpec
from router_index.router import RouteDecision, RoutingOptions

Health = Literal["loading", "ready", "draining", "dead"]
Tier = Literal["device", "host", "disk"]


@dataclass(frozen=True)
class EngineStats:
    health: Health
    queued: int  # admitted, not started (waiting for adapters or for a batch row)
    running: int  # being prefilled or decoded
    adapters: int  # servable adapters of the store
    device: str
    dtype: str
    dead_reason: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter of the store and where it is now."""

    id: str
    tier: Tier  # the fastest tier holding it
    rank: int
    modules: int  # LoRA-targeted layers
    bytes: int  # tensors once loaded
    exemplars: int
    requests: int  # requests using its device slot now (0 when not on the device)
    pinned: bool  # kept on the device by the settings


@dataclass(frozen=True)
class RefusedAdapter:
    id: str
    reason: str  # the validation error, naming the culprit


class EngineClient(Protocol):
    """What the API may call. `Engine` implements it."""

    @property
    def ready(self) -> bool: ...

    def health(self) -> Health: ...

    def stats(self) -> EngineStats: ...

    def models(self) -> list[str]:
        """`auto`, `base` and every servable adapter of the store."""

    def adapters(self) -> list[AdapterInfo]: ...

    def refused_adapters(self) -> list[RefusedAdapter]: ...

    def check_capacity(self, requests: int = 1) -> None:
        """Raise EngineOverloadedError at once when `requests` more would not be admitted."""

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def routing_options(self, **overrides: object) -> RoutingOptions: ...

    def merge_spec(self, method: str, params: dict[str, object], storage: object,
                   rank: object) -> MergeSpec: ...

    def route(self, text: str, options: RoutingOptions | None = None) -> RouteDecision: ...

    def submit(self, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationStream: ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]: ...

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]: ...

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]: ...

    @property
    def embedder_name(self) -> str: ...

    @property
    def embedding_dim(self) -> int: ...

    def preview_merge(self, adapter_ids: Sequence[str],
                      max_modules: int = 24) -> InterferencePreview: ...

    def register_adapter(self, adapter_id: str) -> None: ...

    def unregister_adapter(self, adapter_id: str) -> None: ...

    def drain(self, timeout_s: float) -> bool: ...

    def shutdown(self) -> None: ...
