"""The wire protocol: every NATS subject, header and message shape durable's processes exchange.

Client, worker, router and gateway meet only on NATS; this module is the one place that says
what travels there, so each side encodes with the same function the other decodes with. The
JSON schemas in ``schemas/`` describe the same messages for other languages.

Requests. Canonical subject ``do.<namespace>.<object-id>.<verb>`` (verb: ``rpc.<method>``,
``fetch``, ``alarm``, ``ws.message|close|error``). Workers subscribe per partition to
``dop.<partition>.<namespace>.<object-id>.<verb>`` in queue group ``p<partition>``; the
partition is ``fnv1a_32(object-id) mod P``, the same hash as the NATS ``partition(P, n)`` subject
transform, so callers compute it themselves and raw publishers (``nats req``) reach the same
place through the server mapping. A failed request is answered with the NATS micro error
headers and a body ``{"error": {...}}`` (``DurableError.to_wire``).

Gateways. Objects send frames and closes to a gateway as one message of *operations* on
``dgw.<key>.<gateway>`` (``schemas/gateway_message.json``); the gateway's events for an
object's sockets are ordinary requests with the verbs ``ws.message``, ``ws.close`` and
``ws.error`` (``schemas/ws_event.json``); gateways announce themselves on ``dgwhb.<key>``.

Tail. ``durable tail`` publishes ``dtail.<key>.interest`` every 2 s while it runs; workers that
heard one in the last 6 s publish each request, alarm run and object log line as JSON on
``dtail.<key>.ev.<namespace>.<object-id>.<kind>``, and nothing otherwise.

Alarms. One JetStream work-queue stream per deployment: schedules on
``dal.<key>.s.<partition>.<object>``, fires on ``dal.<key>.f.<partition>.<object>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import codec
from .errors import DurableError, InvalidRequest, ProtocolError

# ----- requests to objects -----------------------------------------------------------------

CANONICAL_PREFIX = "do"
PARTITIONED_PREFIX = "dop"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

#: NATS micro-service error headers (ADR-32): set on every error reply
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
#: the percent-encoded name a raw publisher made an object's id from
NAME_HEADER = "Do-Name"
#: a caller's key for a call it may repeat (HTTP and NATS alike; services/objects/idempotency.py)
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: the longest idempotency key accepted (Stripe's limit; a UUID is 36)
MAX_IDEMPOTENCY_KEY = 255


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(object_id: str, partitions: int) -> int:
    return fnv1a_32(object_id.encode()) % partitions


def is_token(value: str) -> bool:
    """Namespaces and method names must be one safe subject token."""
    return bool(_TOKEN.fullmatch(value))


def request_subject(partition: int, namespace: str, object_id: str, verb: str) -> str:
    return f"{PARTITIONED_PREFIX}.{partition}.{namespace}.{object_id}.{verb}"


@dataclass(frozen=True, slots=True)
class RequestAddress:
    """What a worker reads from a request's subject, split once."""

    namespace: str  #: "?" when the subject has no namespace token (kept for accounting)
    object_id: str
    verb: list[str]
    valid: bool  #: the subject has every token: ``dop.<partition>.<namespace>.<object-id>.<verb...>``


def parse_request_subject(subject: str) -> RequestAddress:
    """The address of a request subject; ``valid`` is False when tokens are missing."""
    tokens = subject.split(".")
    return RequestAddress(tokens[2] if len(tokens) > 2 else "?", tokens[3] if len(tokens) > 3 else "",
                          tokens[4:], len(tokens) >= 5)


def partition_filter(partition: int) -> str:
    return f"{PARTITIONED_PREFIX}.{partition}.>"


def acquired_subject(deployment_key: int, partition: int) -> str:
    """Where a worker announces that it took ``partition`` (payload: the epoch), just before it
    subscribes: callers give up sooner on requests the previous owner will never answer."""
    return f"dpa.{deployment_key}.{partition}"


def acquired_wildcard(deployment_key: int) -> str:
    return f"dpa.{deployment_key}.*"


def partition_of_subject(subject: str) -> int | None:
    """The partition of a ``dop.<partition>.…`` request subject (None for any other)."""
    if not subject.startswith(PARTITIONED_PREFIX + "."):
        return None
    start = len(PARTITIONED_PREFIX) + 1
    end = subject.find(".", start)
    token = subject[start:end] if end > 0 else ""
    return int(token) if token.isdigit() else None


def partition_queue(partition: int) -> str:
    """The queue group named for the partition: in a hand-over overlap one subscriber gets each request."""
    return f"p{partition}"


def server_mapping(partitions: int) -> str:
    """The nats-server ``mappings`` entry that routes canonical subjects to partitions."""
    return (
        f'"{CANONICAL_PREFIX}.*.*.>": '
        f'"{PARTITIONED_PREFIX}.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.>"'
    )


def header(headers: dict[str, str], name: str) -> str | None:
    """A header by name, case-insensitively (NATS keeps the case the publisher used)."""
    value = headers.get(name)
    if value is None:
        lname = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lname), None)
    return value


def idempotency_key(headers: dict[str, str] | None) -> str | None:
    """The request's idempotency key, checked: 1 to 255 printable ASCII characters."""
    if not headers:
        return None
    key = header(headers, IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
                             f"characters (got {len(key)} characters)")
    return key


def encode_error_reply(error: DurableError, as_json: bool) -> tuple[dict[str, str], bytes]:
    """Headers and body of an error reply."""
    # NATS trims header values: a blank message would leave the error header empty
    headers = {ERROR_HEADER: error.message.replace("\r", " ").replace("\n", " ").strip()[:1000].rstrip()
               or error.code,
               ERROR_CODE_HEADER: str(error.status)}
    if as_json:
        headers["Content-Type"] = codec.JSON_CONTENT_TYPE
    return headers, codec.dumps({"error": error.to_wire()}, as_json)


def decode_reply(headers: dict[str, str] | None, data: bytes) -> Any:
    """A reply's value, or the remote error rebuilt as its DurableError class."""
    if headers and ERROR_HEADER in headers:
        try:
            body = codec.unpack(data) if data else None
        except Exception:  # noqa: BLE001 - any undecodable body: the headers still say what failed
            body = None
        if isinstance(body, dict) and "error" in body:
            raise DurableError.from_wire(body["error"])
        raise ProtocolError(f"{headers.get(ERROR_CODE_HEADER)} {headers[ERROR_HEADER]}")
    try:
        return codec.unpack(data) if data else None
    except Exception as exc:  # noqa: BLE001 - any undecodable body is the same protocol error
        raise ProtocolError(f"malformed reply: {exc}") from None


# ----- gateways ------------------------------------------------------------------------------

#: headers a gateway puts on the upgrade request it hands to the user's routing code
SOCKET_ID_HEADER = "do-websocket-id"
GATEWAY_HEADER = "do-websocket-gateway"
#: headers on the 101 reply: which object accepted the socket, and its auto-response pair
OBJECT_HEADER = "do-websocket-object"
AUTO_RESPONSE_HEADER = "do-websocket-auto-response"

#: the largest frame a gateway takes from a client, and an object may send
MAX_MESSAGE_BYTES = 1024 * 1024
#: one gateway message carries at most about this many payload bytes (NATS max_payload is 1 MiB)
GATEWAY_MESSAGE_BUDGET = 768 * 1024


def auto_response_header(pair: tuple[str, str]) -> str:
    """The ``do-websocket-auto-response`` value of a 101 reply: the pair as a JSON list."""
    return codec.dumps(list(pair), True).decode()


def parse_auto_response_header(value: str) -> tuple[str, str]:
    request_text, response_text = codec.loads(value.encode(), True)
    return str(request_text), str(response_text)


def socket_query(socket_id: str) -> bytes:
    """A question to a gateway about one socket: when did it last send the auto-response?"""
    return codec.dumps({"sid": socket_id}, False)


def parse_socket_query(data: bytes) -> str:
    socket_id = codec.loads(data, False)["sid"]
    if not isinstance(socket_id, str):
        raise TypeError("'sid' must be a str")
    return socket_id


def socket_query_answer(timestamp_ms: int | None) -> bytes:
    return codec.dumps(timestamp_ms, False)


def parse_socket_query_answer(data: bytes) -> int | None:
    value = codec.loads(data, False)
    return value if isinstance(value, int) else None


def gateway_subject(deployment_key: int, gateway: str) -> str:
    """Where a gateway receives frames to send and closes to perform."""
    return f"dgw.{deployment_key}.{gateway}"


def gateway_query_subject(deployment_key: int, gateway: str) -> str:
    """Where a gateway answers questions about its sockets (auto-response timestamps)."""
    return f"dgw.{deployment_key}.{gateway}.q"


def heartbeat_subject(deployment_key: int) -> str:
    return f"dgwhb.{deployment_key}"


def probe_subject(deployment_key: int, worker_id: str) -> str:
    """A worker's own probe: seeing it come back proves the worker's NATS link carries messages."""
    return f"dgwprobe.{deployment_key}.{worker_id}"


@dataclass(frozen=True, slots=True)
class SendOp:
    """Send one frame to several sockets (a broadcast names the payload once)."""

    socket_ids: list[str]
    data: str | bytes


@dataclass(frozen=True, slots=True)
class CloseOp:
    socket_id: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class AutoOp:
    """The sockets' auto-response pair (None clears it)."""

    socket_ids: list[str]
    pair: tuple[str, str] | None


GatewayOp = SendOp | CloseOp | AutoOp


def op_to_wire(op: GatewayOp) -> list[Any]:
    """``["send", [ids], data]`` | ``["close", id, code, reason]`` | ``["auto", [ids], req, res]``."""
    if isinstance(op, SendOp):
        return ["send", op.socket_ids, op.data]
    if isinstance(op, CloseOp):
        return ["close", op.socket_id, op.code, op.reason]
    return ["auto", op.socket_ids, *(op.pair or (None, None))]


def op_from_wire(raw: Any) -> GatewayOp:
    """One operation of gateway_message.json; TypeError/ValueError names what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise TypeError("an operation is a non-empty list")
    kind = raw[0]
    if kind == "send":
        _, sids, data = raw
        if not isinstance(data, str | bytes):
            raise TypeError(f"a frame is str or bytes, not {type(data).__name__}")
        return SendOp(_ids(sids), data)
    if kind == "close":
        _, sid, code, reason = raw
        return CloseOp(str(sid), int(code), str(reason))
    if kind == "auto":
        _, sids, request_text, response_text = raw
        pair = None if request_text is None else (str(request_text), str(response_text))
        return AutoOp(_ids(sids), pair)
    raise ValueError(f"unknown operation {kind!r}")


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("socket ids are a list of str")
    return value


def _op_size(op: GatewayOp) -> int:
    if isinstance(op, SendOp):
        return 64 + len(op.data) + 40 * len(op.socket_ids)
    if isinstance(op, AutoOp):
        return 64 + 40 * len(op.socket_ids)
    return 64 + 40


def split_ops(ops: list[GatewayOp], budget: int = GATEWAY_MESSAGE_BUDGET) -> list[list[GatewayOp]]:
    """Cut one gateway's operations, in order, into messages that fit NATS' max_payload."""
    chunks: list[list[GatewayOp]] = [[]]
    size = 0
    for op in ops:
        op_size = _op_size(op)
        if chunks[-1] and size + op_size > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(op)
        size += op_size
    return chunks


def encode_ops(ops: list[GatewayOp]) -> bytes:
    return codec.dumps({"ops": [op_to_wire(op) for op in ops]}, False)


def decode_ops(data: bytes) -> list[Any]:
    """The raw operations of a gateway message (each decoded by ``op_from_wire``, so one bad
    operation does not stop the others)."""
    ops = codec.loads(data, False)["ops"]
    if not isinstance(ops, list):
        raise TypeError(f"'ops' must be a list, not {type(ops).__name__}")
    return ops


#: the verbs of a gateway's events for an object's sockets, and their fields
WS_EVENTS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "message": {"sid": str, "data": (str, bytes)},
    "close": {"sid": str, "code": int, "reason": str, "clean": bool},
    "error": {"sid": str, "error": str},
}


def ws_message(socket_id: str, data: str | bytes) -> bytes:
    return codec.dumps({"sid": socket_id, "data": data}, False)


def ws_close(socket_id: str, code: int, reason: str, clean: bool) -> bytes:
    return codec.dumps({"sid": socket_id, "code": code, "reason": reason, "clean": clean}, False)


def ws_error(socket_id: str, error: str) -> bytes:
    return codec.dumps({"sid": socket_id, "error": error}, False)


def parse_ws_event(kind: str, payload: Any) -> dict[str, Any]:
    """A gateway's event payload, checked: a malformed one is refused, never half-handled."""
    fields = WS_EVENTS.get(kind)
    if fields is None:
        raise InvalidRequest(f"unknown WebSocket event {kind!r}: expected ws.message, ws.close or ws.error")
    if not isinstance(payload, dict):
        raise InvalidRequest(f"a WebSocket event needs a map, not {type(payload).__name__}")
    for name, expected in fields.items():
        if not isinstance(payload.get(name), expected):
            raise InvalidRequest(f"a WebSocket event needs {name!r} of type {expected}")
    return payload


def gateway_heartbeat(gateway: str, sockets: int) -> bytes:
    return codec.dumps({"gw": gateway, "sockets": sockets}, False)


def parse_gateway_heartbeat(data: bytes) -> str | None:
    try:
        gateway = codec.loads(data, False)["gw"]
    except Exception:  # noqa: BLE001 - not a heartbeat of ours
        return None
    return gateway if isinstance(gateway, str) else None


# ----- tail (durable tail) --------------------------------------------------------------------

#: a tailer says it is listening this often; workers publish events for TAIL_LINGER_S after the last
TAIL_INTEREST_EVERY_S = 2.0
TAIL_LINGER_S = 6.0


def tail_interest_subject(deployment_key: int) -> str:
    """Where a running ``durable tail`` announces itself; workers publish events only while one does."""
    return f"dtail.{deployment_key}.interest"


def tail_event_subject(deployment_key: int, namespace: str, object_id: str, kind: str) -> str:
    """One live event of one object: ``kind`` is request, alarm or log."""
    return f"dtail.{deployment_key}.ev.{namespace}.{object_id or '-'}.{kind}"


def tail_filter(deployment_key: int, namespace: str | None = None, object_id: str | None = None) -> str:
    """The subscription of a tailer: everything, one class, or one object."""
    return f"dtail.{deployment_key}.ev.{namespace or '*'}.{object_id or '*'}.*"


def encode_tail_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), default=str).encode()


def decode_tail_event(data: bytes) -> dict[str, Any]:
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError("a tail event is a JSON object")
    return event


# ----- alarms ----------------------------------------------------------------------------------

#: the one durable consumer for every fire, delivered to the workers as a queue group
ALARM_CONSUMER = "fires"


@dataclass(frozen=True, slots=True)
class AlarmSubjects:
    """The alarm stream's names for one deployment."""

    deployment_key: int

    @property
    def prefix(self) -> str:
        return f"dal.{self.deployment_key}"

    @property
    def stream(self) -> str:
        return f"DURABLE_ALARMS_{self.deployment_key}"

    def schedule(self, partition: int, object_id: str) -> str:
        return f"{self.prefix}.s.{partition}.{object_id}"

    def fire(self, partition: int, object_id: str) -> str:
        return f"{self.prefix}.f.{partition}.{object_id}"

    @property
    def schedules(self) -> str:
        return f"{self.prefix}.s.>"

    @property
    def fires(self) -> str:
        return f"{self.prefix}.f.>"

    @property
    def deliver(self) -> str:
        return f"{self.prefix}.d"


@dataclass(frozen=True, slots=True)
class AlarmFire:
    partition: int
    object_id: str
    namespace: str
    generation: int


def alarm_schedule_body(namespace: str, generation: int) -> bytes:
    return codec.dumps({"ns": namespace, "gen": generation}, False)


def parse_alarm_fire(subject: str, data: bytes) -> AlarmFire:
    """A fire message (``dal.<key>.f.<partition>.<object>``); ValueError if malformed."""
    tokens = subject.split(".")
    try:
        body = codec.loads(data, False)
        namespace, generation = body["ns"], body["gen"]
        if len(tokens) != 5 or not isinstance(namespace, str) or not isinstance(generation, int):
            raise ValueError("bad fields")
        return AlarmFire(int(tokens[3]), tokens[4], namespace, generation)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong, it is one malformed wake-up
        raise ValueError(f"malformed alarm wake-up on {subject}: {exc}") from None


def alarm_wakeup(generation: int) -> bytes:
    """The payload of an ``alarm`` request a worker forwards to the object's owner."""
    return codec.dumps({"gen": generation}, False)


def parse_alarm_wakeup(payload: Any) -> int:
    if not isinstance(payload, dict) or not isinstance(payload.get("gen"), int):
        raise InvalidRequest("an alarm wake-up needs a map with an integer 'gen'")
    return int(payload["gen"])
