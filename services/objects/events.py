"""``ctx.emit(name, payload, headers)``: checking an event and staging it with the object's writes.

An emitted event is a row of the transactional outbox (outbox.py): it is staged among the
object's pending writes, so the flush that commits the event's storage writes commits it too
(both or neither), and it is published to JetStream only after that commit. Everything here is
checked at the ``emit`` call, before anything is staged: bad input raises there and changes
nothing.

The subject is ``evt.<Class>.<object id>.<name>``: a consumer picks a class
(``evt.Counter.>``), an object (``evt.Counter.<id>.>``) or an event across objects
(``evt.Counter.*.incremented``) with ordinary NATS wildcards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: the subject prefix of every event (the events stream's subjects are ``evt.>``)
SUBJECT_PREFIX = "evt"
#: longest event name (one subject token)
MAX_NAME = 128
#: at most this many headers, each name and value at most this long
MAX_HEADERS = 16
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 1024
#: what an event's subject and headers may take of a NATS message beside the payload: the payload
#: limit is capped at the server's max_payload less this, so a committed event always fits
HEADROOM = 32 * 1024
#: what the runtime itself sets on every event message
RESERVED_HEADER_PREFIXES = ("nats-", "durable-")

#: one NATS subject token a consumer can match exactly: printable ASCII, no '.', '*' or '>'
_TOKEN = re.compile(r"[\x21-\x7e]+")
_NOT_IN_TOKEN = frozenset(".*>")
#: an HTTP-style header name (NATS headers share the format)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One staged event: where it goes, its body, and its headers as JSON (or None)."""

    subject: str
    payload: bytes
    headers: str | None


def subject(class_name: str, object_id: str, name: str) -> str:
    return f"{SUBJECT_PREFIX}.{class_name}.{object_id}.{name}"


def check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"emit(name): the event name must be a str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME or not _TOKEN.fullmatch(name) or not _NOT_IN_TOKEN.isdisjoint(name):
        raise ValueError(
            f"emit(name): {name[:MAX_NAME + 8]!r} is not a valid event name: it becomes one NATS subject "
            f"token, so it must be 1 to {MAX_NAME} characters with no dots, spaces, '*' or '>'")
    return name


def encode_payload(payload: Any, limit: int) -> bytes:
    """``bytes`` go as they are; anything else as compact JSON. At most ``limit`` bytes."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        body = bytes(payload)
    else:
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"emit(payload): the payload must be bytes or JSON-encodable: {exc}") from None
    if len(body) > limit:
        raise ValueError(f"emit(payload): the payload is {len(body)} bytes; an event carries at most {limit} "
                         "bytes (DURABLE_EVENT_MAX_BYTES, and below the NATS server's max_payload)")
    return body


def encode_headers(headers: Any) -> str | None:
    """``{str: str}`` as JSON, or None. Names are header tokens; values have no line breaks;
    ``Nats-*`` and ``Durable-*`` are the runtime's own."""
    if headers is None:
        return None
    if not isinstance(headers, dict):
        raise TypeError(f"emit(headers): headers must be a dict of str to str, not {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"emit(headers): at most {MAX_HEADERS} headers, got {len(headers)}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"emit(headers): headers must map str to str, got {key!r}: {type(value).__name__}")
        if not key or len(key) > MAX_HEADER_NAME or not _HEADER_NAME.fullmatch(key):
            raise ValueError(f"emit(headers): {key[:MAX_HEADER_NAME]!r} is not a valid header name")
        if key.lower().startswith(RESERVED_HEADER_PREFIXES):
            raise ValueError(f"emit(headers): {key!r}: headers starting with Nats- or Durable- are set by the runtime")
        if len(value) > MAX_HEADER_VALUE or "\r" in value or "\n" in value:
            raise ValueError(f"emit(headers): the value of {key!r} must be one line of at most "
                             f"{MAX_HEADER_VALUE} characters")
    return json.dumps(headers, separators=(",", ":")) if headers else None


def make_record(class_name: str, object_id: str, name: Any, payload: Any, headers: Any, limit: int) -> EventRecord:
    """The checked event, or a clear error (nothing staged)."""
    return EventRecord(subject(class_name, object_id, check_name(name)), encode_payload(payload, limit),
                       encode_headers(headers))
