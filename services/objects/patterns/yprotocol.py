"""The y-websocket wire protocol (y-protocols), read strictly: what a Yjs client sends and expects.

Every frame is binary and starts with a varUint message type: 0 sync, 1 awareness, 2 auth,
3 query-awareness. A sync frame carries a second varUint (0 step 1: the sender's state vector;
1 step 2: the update the other side lacks; 2 update) and then a varUint8Array (a varUint length,
then that many bytes). An awareness frame carries one varUint8Array holding
``count, (client id, clock, JSON state as varString) * count``.

The reader here refuses anything a well-behaved client never sends (a truncated varint, a length
that runs past the frame, bytes after the message, a varUint wider than JavaScript's safe
integers, awareness state that is not JSON) with :class:`ProtocolError`, whose close code and
reason the document object sends back, so a broken frame is refused whole and changes nothing.
pycrdt's own ``Decoder`` reads past the end of a truncated frame instead (an IndexError), which
is why this module exists.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

#: lib0 encodes numbers up to 2**53 - 1 (JavaScript's safe integers) as varUints
MAX_VAR_UINT = 2**53 - 1

#: WebSocket close codes the document uses. y-websocket's WebsocketProvider does not reconnect
#: after a close code in 4400-4499 (the server decided; retrying the same frame cannot help).
CLOSE_BAD_FRAME = 4400
CLOSE_TOO_LARGE = 4413


class MessageType(enum.IntEnum):
    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3


class SyncStep(enum.IntEnum):
    STEP1 = 0  #: a state vector: "send me what I lack"
    STEP2 = 1  #: the answer to a step 1: an update
    UPDATE = 2  #: an incremental update


class ProtocolError(ValueError):
    """A frame that is not valid y-websocket (or breaks a limit): refused whole."""

    def __init__(self, reason: str, code: int = CLOSE_BAD_FRAME) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class Frame:
    """One client frame: its message type, the sync step (sync frames only) and its payload
    (the varUint8Array's bytes; empty for query-awareness and auth)."""

    kind: MessageType
    step: SyncStep | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    """One client's awareness: ``state`` is its JSON text; ``"null"`` means the client left."""

    client_id: int
    clock: int
    state: str

    @property
    def removed(self) -> bool:
        return self.state == "null"


class Reader:
    """Reads varUints, varUint8Arrays and varStrings from one frame, never past its end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def var_uint(self, what: str) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise ProtocolError(f"truncated frame: the varUint {what} runs past its end")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 56:
                raise ProtocolError(f"the varUint {what} is longer than 8 bytes")
        if value > MAX_VAR_UINT:
            raise ProtocolError(f"the varUint {what} is over 2**53 - 1")
        return value

    def var_bytes(self, what: str) -> bytes:
        length = self.var_uint(f"length of {what}")
        end = self.pos + length
        if end > len(self.data):
            raise ProtocolError(f"truncated frame: {what} says {length} bytes, "
                                f"{len(self.data) - self.pos} follow")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def var_string(self, what: str) -> str:
        try:
            return self.var_bytes(what).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not UTF-8") from None

    def end(self, what: str) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} bytes after the end of {what}")


def parse_frame(data: bytes) -> Frame:
    """A client frame, checked whole (ProtocolError otherwise)."""
    reader = Reader(data)
    code = reader.var_uint("message type")
    try:
        kind = MessageType(code)
    except ValueError:
        raise ProtocolError(f"unknown message type {code} (0 sync, 1 awareness, 2 auth, "
                            "3 query-awareness)") from None
    if kind is MessageType.SYNC:
        step_code = reader.var_uint("sync step")
        try:
            step = SyncStep(step_code)
        except ValueError:
            raise ProtocolError(f"unknown sync step {step_code} (0 step 1, 1 step 2, 2 update)") from None
        payload = reader.var_bytes("the sync payload")
        reader.end("the sync message")
        return Frame(kind, step, payload)
    if kind is MessageType.AWARENESS:
        payload = reader.var_bytes("the awareness update")
        reader.end("the awareness message")
        return Frame(kind, None, payload)
    # auth (a permission reply, which servers send and clients do not) and query-awareness carry
    # nothing we read
    return Frame(kind, None, b"")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity; JSON.parse does not


def parse_awareness(payload: bytes) -> list[AwarenessEntry]:
    """The entries of an awareness update; each state must be JSON (Yjs clients JSON.parse it)."""
    reader = Reader(payload)
    count = reader.var_uint("awareness entry count")
    entries = []
    for _ in range(count):
        client_id = reader.var_uint("awareness client id")
        clock = reader.var_uint("awareness clock")
        state = reader.var_string("awareness state")
        try:
            json.loads(state, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ProtocolError(f"the awareness state of client {client_id} is not JSON") from None
        entries.append(AwarenessEntry(client_id, clock, state))
    reader.end("the awareness update")
    return entries


# ----- writing ---------------------------------------------------------------------------------


def has_structs(update: bytes) -> bool:
    """Whether a (v1) update carries any structs, not just a delete set: it begins with the
    number of clients whose structs follow."""
    return Reader(update).var_uint("struct groups") > 0


def var_uint(value: int) -> bytes:
    if not 0 <= value <= MAX_VAR_UINT:
        raise ValueError(f"a varUint is from 0 to 2**53 - 1, not {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


def sync_message(step: SyncStep, payload: bytes) -> bytes:
    """A sync frame: step 1 carries a state vector, step 2 and update an update."""
    return var_uint(MessageType.SYNC) + var_uint(step) + var_bytes(payload)


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    """An awareness update (the payload of an awareness frame)."""
    out = bytearray(var_uint(len(entries)))
    for e in entries:
        out += var_uint(e.client_id) + var_uint(e.clock) + var_bytes(e.state.encode())
    return bytes(out)


def awareness_message(payload: bytes) -> bytes:
    return var_uint(MessageType.AWARENESS) + var_bytes(payload)
