"""Stream messages as events of an object: the ``Message`` a handler gets, and the per-object guard.

A subscription's consumer (subscriptions.py) delivers each JetStream message as a request with
the verb ``msg.<subscription>`` and the idempotency key ``sub:<subscription>:<sequence>``
(sequence zero-padded, so keys sort as sequences do). The dispatcher runs it as a keyed call
(idempotency.py) with one difference: only a *successful* run is recorded. So:

- the key's record commits in the same flush as the handler's writes; a redelivery of a recorded
  sequence gets the recorded reply and the handler does not run again (exactly once in effect);
- a handler that raises after writing resets the instance: its writes of that attempt were held
  back from the flusher by the keyed event, and are dropped with it, so a retry starts from
  committed state and nothing of a failed attempt is applied twice (in-memory fields are rebuilt
  too). The reset also fails the events queued on the object and drops other events' writes
  waiting for the same flush: their callers get ``object_reset`` (retryable), as after a failed
  flush. A handler that raises before writing anything resets nothing (like any handler error);
- the **order guard**: before the handler runs, the highest sequence of the subscription already
  applied to this object (kept on the instance, read from the recorded keys on its first message)
  must be lower than this message's. A message that arrives after a later one was applied is
  refused with ``out_of_order`` and never runs; the consumer parks it for the operator. Its
  consumer delivers in stream order per object, so this only fires if that order was lost (see
  subscriptions.py); the guard makes sure it never silently runs out of order.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InvalidRequest, MessageFailed, OutOfOrder, UnknownMethod
from .base import DurableObject
from .instance import Instance

Handler = Callable[[Any], Awaitable[Any]]

#: the verb of a stream message: ``msg.<subscription>``
MESSAGE_VERB = "msg"


def message_key(subscription: str, sequence: int) -> str:
    """The idempotency key of one stream message (sorts by sequence within a subscription)."""
    return f"{key_prefix(subscription)}{sequence:020d}"


def key_prefix(subscription: str) -> str:
    return f"sub:{subscription}:"


@dataclass(frozen=True)
class Message:
    """One stream message, as ``on_message(self, msg)`` receives it."""

    #: the subscription (``[[subscriptions]]`` name) it came through
    subscription: str
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    #: its sequence in the stream: increases with every message, per object too
    sequence: int = 0
    #: this delivery's attempt, from 1 (retries after the handler raised, redeliveries)
    delivery_count: int = 1

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.data)

    def text(self) -> str:
        return self.data.decode()


def encode_message(msg: Message, handler: str, name: str) -> dict[str, Any]:
    """The request payload of a message (``name``: the object's name, as stubs send it)."""
    return {"name": name, "handler": handler, "subject": msg.subject, "data": msg.data, "headers": msg.headers,
            "seq": msg.sequence, "attempt": msg.delivery_count}


def decode_message(subscription: str, payload: Any) -> tuple[Message, str]:
    """The message and the handler's name; InvalidRequest for anything malformed."""
    if not isinstance(payload, dict):
        raise InvalidRequest("a stream message's payload must be a map")
    handler, subject, data = payload.get("handler"), payload.get("subject"), payload.get("data")
    headers, seq, attempt = payload.get("headers") or {}, payload.get("seq"), payload.get("attempt", 1)
    if not isinstance(handler, str) or not isinstance(subject, str) or not isinstance(data, bytes):
        raise InvalidRequest("a stream message needs 'handler' and 'subject' (strings) and 'data' (bytes)")
    if not isinstance(seq, int) or seq < 1 or not isinstance(attempt, int) or attempt < 1:
        raise InvalidRequest("a stream message needs 'seq' and 'attempt' (positive integers)")
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise InvalidRequest("a stream message's 'headers' must map strings to strings")
    return Message(subscription, subject, data, dict(headers), seq, attempt), handler


def message_handler(inst: Instance, subscription: str, payload: Any) -> Handler:
    """The event of one stream message: the order guard, then the class's handler."""
    msg, name = decode_message(subscription, payload)
    if name.startswith("_") or name in DurableObject.EVENT_HANDLERS or not callable(getattr(inst.cls, name, None)):
        raise UnknownMethod(f"{inst.cls.__name__} has no message handler {name!r} (subscription {subscription!r})")

    async def deliver(obj: Any) -> None:
        await check_order(inst, subscription, msg.sequence)
        try:
            result = getattr(obj, name)(msg)
            if hasattr(result, "__await__"):
                await result
        except Exception as exc:  # noqa: BLE001 - any failure of the handler is this attempt's failure
            error = MessageFailed(f"{name}() raised {type(exc).__name__}: {exc}", remote_type=type(exc).__name__)
            if inst.output.has_unflushed:  # the attempt's writes (held back by the keyed event) go with it
                inst.fail(error)
            raise error from None
        inst.stream_seqs[subscription] = msg.sequence

    return deliver


async def check_order(inst: Instance, subscription: str, sequence: int) -> None:
    """Refuse a message older than one of its subscription already applied to this object."""
    last = inst.stream_seqs.get(subscription)
    if last is None:
        key = await inst.runtime.store.last_key(inst.object_id, key_prefix(subscription))
        last = int(key.rpartition(":")[2]) if key else 0
        inst.stream_seqs[subscription] = last
    if sequence <= last:
        raise OutOfOrder(f"stream sequence {sequence} of subscription {subscription!r} arrived after sequence "
                         f"{last} was applied to this object; running it now would break stream order, so it "
                         "was not run")
