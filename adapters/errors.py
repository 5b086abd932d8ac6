"""Errors raised while loading, validating and addressing adapters.

Each names the culprit, so that the API layer can pass the message to the user unchanged.
"""


class AdapterError(Exception):
    """Base class of every adapter problem a user can cause; `param` names the request field
    at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterNotFoundError(AdapterError):
    """The adapter id names nothing in the store, or nothing loaded."""


class RefusedAdapterError(AdapterError):
    """The adapter is in the store but was refused at validation; the message says why."""


class IncompatibleAdapterError(AdapterError):
    """The adapter cannot be applied to the resident base model (shapes, modules, type)."""


class UnsafeAdapterError(AdapterError):
    """The adapter asks for something we refuse: pickle weights, a path outside the store."""


class AdapterCapacityError(AdapterError):
    """Every slot of a bounded adapter structure is taken."""
