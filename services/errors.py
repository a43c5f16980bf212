"""The errors a caller of durable can meet, each with ``retryable`` / ``overloaded`` and a
``code`` that travels on the wire (``except durable.errors.DurableError``)."""

from .core.errors import (
    ConfigError,
    DurableError,
    InvalidId,
    InvalidRequest,
    ObjectReset,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    StorageError,
    StorageUnavailable,
    Unavailable,
    UnknownMethod,
    UnknownNamespace,
    UnknownSocket,
)

__all__ = [
    "ConfigError",
    "DurableError",
    "InvalidId",
    "InvalidRequest",
    "ObjectReset",
    "Overloaded",
    "PayloadTooLarge",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "StorageError",
    "StorageUnavailable",
    "Unavailable",
    "UnknownMethod",
    "UnknownNamespace",
    "UnknownSocket",
]
