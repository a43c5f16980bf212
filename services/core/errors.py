"""The one exception hierarchy of durable, and how it travels on the wire.

Every error has a stable wire ``code``, a numeric ``status`` (the value of the
``Nats-Service-Error-Code`` header, HTTP-like so that ``nats req`` users can read it),
and the ``retryable`` / ``overloaded`` flags Cloudflare puts on its errors. The wire carries
``{code, type, message, retryable, overloaded}``; the caller rebuilds the same class from
``code`` through a registry that refuses duplicates.
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type[DurableError]] = {}


class DurableError(Exception):
    """Root of every error durable raises."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    default_retryable: ClassVar[bool] = False
    default_overloaded: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        overloaded: bool | None = None,
        remote_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        self.overloaded = self.default_overloaded if overloaded is None else overloaded
        self.remote_type = remote_type or type(self).__name__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in _REGISTRY:
                raise TypeError(f"duplicate error code {cls.code!r} ({_REGISTRY[cls.code].__name__})")
            _REGISTRY[cls.code] = cls

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "type": self.remote_type,
            "message": self.message,
            "retryable": self.retryable,
            "overloaded": self.overloaded,
        }

    @staticmethod
    def from_wire(data: Any) -> DurableError:
        """Rebuild the error a remote side described; tolerant of malformed input."""
        if not isinstance(data, dict):
            return ProtocolError(f"malformed error reply: {data!r:.200}")
        cls = _REGISTRY.get(str(data.get("code")), DurableError)
        return cls(
            str(data.get("message", "")),
            retryable=bool(data.get("retryable", False)),
            overloaded=bool(data.get("overloaded", False)),
            remote_type=str(data.get("type") or cls.__name__),
        )


_REGISTRY["internal"] = DurableError


class InvalidRequest(DurableError):
    """The request could not be decoded or does not fit the protocol."""

    code = "invalid_request"
    status = 400


class InvalidId(DurableError, ValueError):
    """An object id is malformed or belongs to another namespace."""

    code = "invalid_id"
    status = 400


class UnknownNamespace(DurableError, LookupError):
    code = "unknown_namespace"
    status = 404


class UnknownSocket(DurableError):
    """A WebSocket event names a socket this object has not accepted, or has closed."""

    code = "unknown_socket"
    status = 410


class UnknownMethod(DurableError, AttributeError):
    """The method does not exist on the class, or is private (starts with ``_``)."""

    code = "unknown_method"
    status = 404


class PayloadTooLarge(DurableError):
    code = "payload_too_large"
    status = 413


class StorageError(DurableError, ValueError):
    """Misuse of the storage API or a broken limit; nothing was written."""

    code = "storage"
    status = 400


class StorageUnavailable(DurableError):
    """Postgres could not be reached for a storage read; nothing was cached, retry."""

    code = "storage_unavailable"
    status = 503
    default_retryable = True


class RemoteError(DurableError):
    """An exception raised by object code; ``remote_type`` names its class."""

    code = "remote"
    status = 500


class ObjectReset(DurableError):
    """The object instance was reset (failed flush, failed init); retry on a fresh instance."""

    code = "object_reset"
    status = 503
    default_retryable = True


class NotOwner(DurableError):
    """This worker does not (or no longer) own the object's partition."""

    code = "not_owner"
    status = 503
    default_retryable = True


class Unavailable(DurableError):
    """No worker answered (no responders) until the retry deadline."""

    code = "unavailable"
    status = 503
    default_retryable = True


class RequestTimeout(DurableError, TimeoutError):
    """No reply in time; the request may have been delivered, so it was not repeated. Its
    outcome is unknown: repeating it may apply it twice, so it is not marked retryable."""

    code = "timeout"
    status = 504
    default_retryable = False


class IdempotencyKeyReused(DurableError):
    """An idempotency key already recorded for another call of the object (another method or
    verb): the recorded reply belongs to that call, so it is not returned for this one."""

    code = "idempotency_key_reused"
    status = 422


class IdempotencyInterrupted(DurableError):
    """The first call made with this idempotency key made part of its writes durable (it awaited
    an outgoing call or ``sync()``) and its worker stopped before it finished: its outcome is
    partial, so it is neither run again nor answered as if it had finished."""

    code = "idempotency_interrupted"
    status = 409


class Overloaded(DurableError):
    code = "overloaded"
    status = 503
    default_overloaded = True


class ProtocolError(DurableError):
    code = "protocol"
    status = 502


class ConfigError(DurableError):
    """durable.toml or the settings are broken; raised at start-up."""

    code = "config"
    status = 500


class MessageFailed(DurableError):
    """A stream message's handler raised: nothing of that attempt was kept, the message is
    retried, then parked (services/objects/subscriptions.py)."""

    code = "message_failed"
    status = 500


class OutOfOrder(DurableError):
    """A stream message arrived after a later one of its subscription was applied to the same
    object: running it would break stream order, so it is parked instead."""

    code = "out_of_order"
    status = 409
