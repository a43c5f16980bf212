"""Requests to objects: from a NATS message to the handler it names, and the reply back.

A request arrives as a NATS message, or as a local call from a Client in this same process
(local.py); either way it runs here, and its reply goes to one small *reply sink*: a NATS
publish to the message's reply subject, or a future the local caller awaits.

A request's verb (the subject's tail) picks the handler: ``rpc.<method>``, ``fetch``, ``alarm``
(a wake-up forwarded by another worker) or ``ws.message|close|error`` (a gateway's socket
events). The handler runs as one event of the object; its reply, value or error, leaves behind
the output gate, and never from an instance whose lease lapsed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import unquote

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from ..core import codec, telemetry, wire
from ..core.errors import (
    DurableError,
    InvalidRequest,
    NotOwner,
    ObjectReset,
    PayloadTooLarge,
    RemoteError,
    UnknownMethod,
    UnknownSocket,
)
from ..core.http import Request, Response
from ..core.metrics import RequestSeries, WorkerMetrics
from .admin import ADMIN_STATE_VERB, state_write_handler
from .alarm_rules import RunOutcome
from .alarms import Alarms
from .base import DurableObject
from .history_admin import ADMIN_FORK_VERB, ADMIN_RESTORE_VERB, fork_handler, restore_handler
from .idempotency import KeyedRun, Prepared
from .instance import Instance
from .messages import MESSAGE_VERB, message_handler
from .micro import MicroService
from .partitions import Partitions, PartitionState
from .sockets import SocketState
from .tail import Tail

log = logging.getLogger("durable.worker")

Handler = Callable[[Any], Awaitable[Any]]

#: what a local caller's future receives: the reply's headers (None if it has none) and body
LocalReply = tuple[dict[str, str] | None, bytes]


class Incoming(Protocol):
    """A request as the dispatcher reads it: a NATS ``Msg``, or a :class:`LocalRequest`."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...


class LocalRequest:
    """A request handed over in process (local.py): the same subject, bytes and headers a NATS
    message would carry, so it is decoded, checked and accounted exactly as one."""

    __slots__ = ("data", "headers", "subject")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers


class ReplySink(Protocol):
    """Where one request's reply (value or error) goes, once it may leave."""

    async def send(self, body: bytes, headers: dict[str, str] | None) -> None: ...


class NatsReply:
    """The reply to a NATS message: published to its reply subject (none: nobody waits)."""

    __slots__ = ("nc", "subject")

    def __init__(self, nc: NatsClient, subject: str) -> None:
        self.nc = nc
        self.subject = subject

    async def send(self, body: bytes, headers: dict[str, str] | None) -> None:
        if self.subject:
            await self.nc.publish(self.subject, body, headers=headers)


class FutureReply:
    """The reply to a local call: the caller's future gets the bytes a NATS reply would carry
    (it decodes them, so caller and object never share a mutable object). A caller that gave
    up (timed out, cancelled) left the future done: the reply is dropped, as NATS drops a reply
    nobody listens to."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[LocalReply]) -> None:
        self.future = future

    async def send(self, body: bytes, headers: dict[str, str] | None) -> None:
        if not self.future.done():
            self.future.set_result((headers, body))


def parse_rpc_payload(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """An RPC call's arguments: a list of args, or a map with ``args`` and/or ``kwargs``."""
    if payload is None:
        return [], {}
    if isinstance(payload, list):
        return payload, {}
    if isinstance(payload, dict):
        unknown = set(payload) - {"args", "kwargs", "name"}
        if unknown:
            raise InvalidRequest(f"rpc payload has unknown fields {sorted(unknown)}; expected 'args' and/or "
                                 "'kwargs'")
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise InvalidRequest("rpc payload: 'args' must be a list and 'kwargs' a map of str keys")
        return args, kwargs
    raise InvalidRequest(f"rpc payload must be a list of args or a map with args/kwargs, not {type(payload).__name__}")


def claimed_name(payload: Any, headers: dict[str, str]) -> str | None:
    """The name the caller made the id from: ``name`` in the payload (stubs), or the
    percent-encoded ``Do-Name`` header (raw publishers). Checked against the id later."""
    if isinstance(payload, dict) and "name" in payload:
        name = payload["name"]
        if not isinstance(name, str):
            raise InvalidRequest(f"'name' must be a string, not {type(name).__name__}")
        return name
    raw = wire.header(headers, wire.NAME_HEADER)
    return unquote(raw) if raw is not None else None


def rpc_handler(cls: type, method: str, payload: Any) -> Handler:
    if method.startswith("_"):
        raise UnknownMethod(f"method {method!r} is private: methods starting with '_' are not callable")
    if method in DurableObject.EVENT_HANDLERS:
        raise UnknownMethod(f"{method!r} is an event handler, delivered by the runtime; it is not "
                            f"callable as an RPC method of {cls.__name__}")
    attr = getattr(cls, method, None)
    if attr is None or not callable(attr):
        raise UnknownMethod(f"{cls.__name__} has no RPC method {method!r}")
    args, kwargs = parse_rpc_payload(payload)

    async def rpc(obj: Any) -> Any:
        result = getattr(obj, method)(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    return rpc


def fetch_handler(inst: Instance, payload: Any) -> Handler:
    """fetch(request); for a WebSocket upgrade from a gateway, request.websocket is the socket
    offered, and a 101 answer carries the accepting object's address back to the gateway."""
    cls = inst.cls
    if getattr(cls, "fetch", None) is None:
        raise UnknownMethod(f"{cls.__name__} does not define fetch()")
    try:
        request = Request.from_wire(payload)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"malformed fetch request: {exc}") from None

    socket_id, gateway = request.headers.get(wire.SOCKET_ID_HEADER), request.headers.get(wire.GATEWAY_HEADER)
    if socket_id and gateway:
        request.websocket = inst.sockets.offered(socket_id, gateway)

    async def do_fetch(obj: Any) -> Any:
        ws = request.websocket
        if ws is not None:
            await inst.sockets.load()  # the auto-response pair goes back with an accept
        try:
            response = await obj.fetch(request)
            if not isinstance(response, Response):
                raise TypeError(f"fetch() must return a Response, not {type(response).__name__}")
        except BaseException:
            if ws is not None and ws.state is SocketState.OPEN:
                inst.sockets.closed(ws.id)  # accepted, then failed: the client never connects
            raise
        if response.status == 101:
            if ws is None or ws.state is not SocketState.OPEN:
                raise RemoteError("fetch() answered 101 without ctx.accept_websocket(request.websocket)"
                                  if ws is not None else
                                  "fetch() answered 101 to a request that is not a WebSocket upgrade",
                                  remote_type="TypeError")
            response.headers.set(wire.OBJECT_HEADER, f"{inst.namespace}.{inst.object_id}")
            if inst.sockets.auto is not None:
                response.headers.set(wire.AUTO_RESPONSE_HEADER, wire.auto_response_header(inst.sockets.auto))
        elif ws is not None and ws.state is SocketState.OPEN:
            inst.sockets.closed(ws.id)  # accepted, then refused: the client never connected
        return response.to_wire()

    return do_fetch


def socket_event_handler(inst: Instance, kind: str, payload: Any) -> Handler:
    """A gateway's event for one of this object's sockets: message, close or error."""
    event = wire.parse_ws_event(kind, payload)
    sid = event["sid"]

    async def deliver(obj: Any) -> Any:
        await inst.sockets.load()
        if kind == "close":
            ws = inst.sockets.closed(sid)
            handler = getattr(obj, "websocket_close", None)
            if ws is not None and handler is not None:
                await handler(ws, event["code"], event["reason"], event["clean"])
            return None
        ws = inst.sockets.by_id.get(sid)
        if ws is None:
            raise UnknownSocket(f"socket {sid[:80]} is not an open WebSocket of this object")
        handler = getattr(obj, f"websocket_{kind}", None)
        if handler is None:
            if kind == "error":
                return None
            raise UnknownMethod(f"{inst.cls.__name__} has no websocket_message() handler")
        await handler(ws, event["data"] if kind == "message" else event["error"])
        return None

    return deliver


class Dispatcher:
    """Runs the requests of the owned partitions and sends their replies."""

    def __init__(self, nc: NatsClient, partitions: Partitions, alarms: Alarms, micro: MicroService,
                 owns: Callable[[int, int], bool], max_request_bytes: int, tail: Tail | None = None,
                 metrics: WorkerMetrics | None = None, idempotency_ttl: float = 86400.0,
                 accepting: Callable[[], bool] | None = None,
                 message_handlers: dict[str, set[str]] | None = None) -> None:
        self.nc = nc
        #: per class, the methods that receive stream messages: delivered by the runtime only, so
        #: a message cannot be forged past the order guard and the key (messages.py)
        self.message_handlers = message_handlers or {}
        #: how long a keyed call's reply is recorded (DURABLE_IDEMPOTENCY_TTL)
        self.idempotency_ttl = idempotency_ttl
        #: false while the owner cannot renew its lease (ownership.reaching_postgres): refuse
        self._accepting = accepting
        #: live events for `durable tail` (published only while someone tails)
        self.tail = tail
        self.metrics = metrics or WorkerMetrics(partitions.classes)
        self.partitions = partitions
        self.alarms = alarms
        self.micro = micro
        self._owns = owns
        self.max_request_bytes = max_request_bytes
        #: when the last request arrived (a stopping worker lingers only if requests were flowing)
        self.last_request = 0.0

    def handler(self, inst: Instance, verb: list[str], payload: Any) -> Handler:
        if len(verb) == 2 and verb[0] == "ws":
            return socket_event_handler(inst, verb[1], payload)
        if verb == ["alarm"]:  # a wake-up forwarded by the worker that received it
            event = self.alarms.alarm_event(inst, wire.parse_alarm_wakeup(payload))

            async def alarm(obj: Any) -> str:
                outcome: RunOutcome = await event(obj)
                return outcome.value  # the forwarding worker acknowledges the fire, or not ("busy")

            return alarm
        if len(verb) == 2 and verb[0] == "rpc":
            if verb[1] in self.message_handlers.get(inst.namespace, ()):
                raise UnknownMethod(f"{verb[1]!r} receives stream messages, delivered by the runtime; it is not "
                                    f"callable as an RPC method of {inst.cls.__name__}")
            return rpc_handler(inst.cls, verb[1], payload)
        if verb == ["fetch"]:
            return fetch_handler(inst, payload)
        if len(verb) == 2 and verb[0] == MESSAGE_VERB:  # a stream message (subscriptions.py)
            return message_handler(inst, verb[1], payload)
        if verb == ADMIN_STATE_VERB:
            return state_write_handler(inst, payload)
        if verb == ADMIN_RESTORE_VERB:
            return restore_handler(inst, payload)
        if verb == ADMIN_FORK_VERB:
            return fork_handler(inst, payload)
        raise InvalidRequest(f"unknown verb {'.'.join(verb)!r}: expected rpc.<method> or fetch")

    async def handle(self, state: PartitionState, msg: Msg) -> None:
        """One NATS request of ``state``'s partition (``state.begin()`` was called when it arrived)."""
        try:
            await self._handle(state, msg, NatsReply(self.nc, msg.reply))
        finally:
            state.end()

    async def handle_local(self, state: PartitionState, request: LocalRequest,
                           future: asyncio.Future[LocalReply]) -> None:
        """One request from a caller in this process (``state.begin()`` was called when it was
        handed over); its reply, or error, is set on ``future``."""
        try:
            await self._handle(state, request, FutureReply(future))
        finally:
            state.end()

    async def _handle(self, state: PartitionState, msg: Incoming, sink: ReplySink) -> None:
        started = time.perf_counter()
        headers = msg.headers or {}
        as_json = (wire.header(headers, "Content-Type") or "").lower().startswith(codec.JSON_CONTENT_TYPE)
        address = wire.parse_request_subject(msg.subject)
        namespace = address.namespace
        series = self.metrics.other
        inst: Instance | None = None
        span: Span | None = None
        keyed: KeyedRun | Prepared | None = None
        try:
            if not self.partitions.is_current(state) or not self._owns(state.partition, state.epoch):
                raise NotOwner(f"partition {state.partition} is not owned by this worker")
            if self._accepting is not None and not self._accepting():
                raise NotOwner(f"the owner of partition {state.partition} cannot reach Postgres now; retry")
            if not address.valid:
                raise InvalidRequest(f"malformed subject {msg.subject!r}")
            if len(msg.data) > self.max_request_bytes:
                raise PayloadTooLarge(f"request of {len(msg.data)} bytes is over the limit of "
                                      f"{self.max_request_bytes} bytes")
            payload = codec.loads(msg.data, as_json)
            inst = self.partitions.instance(state, namespace, address.object_id, claimed_name(payload, headers))
            handler = self.handler(inst, address.verb, payload)
            series = self.metrics.series(namespace, address.verb)  # only once a handler exists: bad input adds none
            keyed = await self._keyed(inst, headers, address.verb, as_json)
            if isinstance(keyed, Prepared):  # a repeat: the recorded reply, without running it again
                await self._finish(state, msg, sink, as_json, namespace, series, span, started, None, True,
                                   keyed, None)
                return
            trace_context = telemetry.extract(headers)
            if trace_context is None:
                ok, value, seq = await inst.run_event(handler, keyed)
            else:
                # ended in _finish, once the reply is sent: the flush it waited for is its child
                span = telemetry.tracer.start_span(
                    f"{namespace} {'.'.join(address.verb)}", context=trace_context, kind=SpanKind.SERVER,
                    attributes={"do.partition": state.partition, "do.epoch": state.epoch,
                                "do.object_id": inst.object_id, "do.namespace": namespace},
                )
                with trace.use_span(span, end_on_exit=False):
                    ok, value, seq = await inst.run_event(handler, keyed)
                    inst.trace_flush(span, seq)
        except BaseException as exc:
            if isinstance(keyed, KeyedRun):
                keyed.settle(exc)
            if not isinstance(exc, Exception):
                raise
            # every failure becomes an error reply
            await self._finish(state, msg, sink, as_json, namespace, series, span, started, None, False, exc, None)
            return
        finish: Callable[..., Awaitable[None]] = self._finish
        if isinstance(keyed, KeyedRun):
            finish = functools.partial(self._finish_keyed, keyed)
            if keyed.prepared is not None:
                ok, value = True, keyed.prepared  # the reply as recorded: sent as it is
        handled = time.perf_counter()
        series.queue.observe(inst.event_started - started if inst.event_started >= started else 0.0)
        series.handler.observe(handled - max(inst.event_started, started))
        output = inst.output
        if output.is_durable(seq):
            await finish(state, msg, sink, as_json, namespace, series, span, started, handled, ok, value, None)
        elif output.failed is not None:
            # reset before its writes were durable (abort, failed flush): nothing will flush them
            error = ObjectReset("Durable Object was reset before its writes were confirmed durable (a flush "
                                f"already in flight may still commit them): {output.failed}")
            await finish(state, msg, sink, as_json, namespace, series, span, started, handled, ok, value, error)
        else:
            # the output gate: the flusher sends this reply once the writes before it commit
            output.reply_when_durable(
                seq, functools.partial(finish, state, msg, sink, as_json, namespace, series, span, started,
                                       handled, ok, value))

    async def _keyed(self, inst: Instance, headers: dict[str, str], verb: list[str],
                     as_json: bool) -> KeyedRun | Prepared | None:
        """A call made with an idempotency key (RPC and fetch only): the run that records its
        reply, or, for a repeat, the reply recorded (waiting for it if the first is running)."""
        key = wire.idempotency_key(headers) if verb[0] in ("rpc", "fetch", MESSAGE_VERB) else None
        if key is None:
            if verb[0] == MESSAGE_VERB:
                raise InvalidRequest("a stream message must carry an Idempotency-Key (messages.py)")
            return None
        keys = inst.idempotency_keys()
        call, run = await keys.begin(key, ".".join(verb))
        if run:  # a stream message is recorded only when its handler succeeded (messages.py)
            return KeyedRun(keys, call, as_json, self.idempotency_ttl, record_errors=verb[0] != MESSAGE_VERB)
        # shielded: a repeat that gives up must not cancel the reply the others wait for
        return (await asyncio.shield(call.reply)).for_request(as_json)

    async def _finish_keyed(self, keyed: KeyedRun, *args: Any) -> None:
        """A keyed call's reply: sent as :meth:`_finish` sends any, then given to the repeats
        waiting for it (or, if it never became durable, the error it ended with)."""
        flush_error = args[-1]
        try:
            await self._finish(*args)
        finally:
            keyed.settle(flush_error)

    async def _finish(self, state: PartitionState, msg: Incoming, sink: ReplySink, as_json: bool, namespace: str,
                      series: RequestSeries, span: Span | None, started: float, handled: float | None, ok: bool,
                      value: Any, flush_error: BaseException | None) -> None:
        """Send the reply (or error) of one event, once its writes are durable."""
        try:
            if flush_error is not None:
                raise flush_error
            if not ok:
                raise value
            if isinstance(value, Prepared):  # a keyed call's reply, value or error, as recorded
                if not self._owns(state.partition, state.epoch):
                    return
                await sink.send(value.body, value.headers)
                self._account(msg, namespace, series, span, started, value.error)
                return
            try:
                body = codec.dumps(value, as_json)
            except (TypeError, ValueError, OverflowError) as exc:
                raise RemoteError(f"the return value cannot be sent: {exc}",
                                  remote_type=type(exc).__name__) from None
            if not self._owns(state.partition, state.epoch):
                return  # never reply from an instance whose lease lapsed
            await sink.send(body, {"Content-Type": codec.JSON_CONTENT_TYPE} if as_json else None)
            self._account(msg, namespace, series, span, started, None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            error = exc if isinstance(exc, DurableError) else RemoteError(str(exc), remote_type=type(exc).__name__)
            self._account(msg, namespace, series, span, started, error)
            # runtime errors carry no object state, so they are sent even after the lease lapsed
            # (a flush failure must reach its caller, not become a timeout); errors raised by
            # object code are state, and follow the success path's rule
            if isinstance(error, NotOwner | ObjectReset) or self._owns(state.partition, state.epoch):
                await self._send_error(sink, error, as_json)
        finally:
            end = time.perf_counter()
            if handled is not None:
                series.durable.observe(end - handled)
            series.total.observe(end - started)
            if span is not None:
                span.end()

    def _account(self, msg: Incoming, namespace: str, series: RequestSeries, span: Span | None, started: float,
                 error: DurableError | None) -> None:
        """Count one answered request: service stats, metrics, the span's status, `durable tail`."""
        self.micro.record(namespace, time.perf_counter() - started, error)
        if error is None:
            series.ok.inc()
        else:
            (series.server_error if error.status >= 500 else series.error).inc()
            if span is not None:
                span.set_status(StatusCode.ERROR, error.code)
        if self.tail is not None and self.tail.active:
            self._tail(msg, started, error)

    def _tail(self, msg: Incoming, started: float, error: DurableError | None) -> None:
        """One answered request for `durable tail`: which object, which verb, how long, outcome."""
        assert self.tail is not None
        address = wire.parse_request_subject(msg.subject)
        fields: dict[str, Any] = {"verb": ".".join(address.verb),
                                  "ms": round((time.perf_counter() - started) * 1000, 3),
                                  "outcome": "ok" if error is None else error.code}
        if error is not None:
            fields["error"] = error.message[:1000]
        self.tail.emit("request", address.namespace, address.object_id, **fields)

    async def reply_error(self, msg: Msg, error: DurableError, as_json: bool) -> None:
        """Answer a NATS message with an error."""
        await self._send_error(NatsReply(self.nc, msg.reply), error, as_json)

    @staticmethod
    async def _send_error(sink: ReplySink, error: DurableError, as_json: bool) -> None:
        headers, body = wire.encode_error_reply(error, as_json)
        try:
            await sink.send(body, headers)
        except Exception as exc:  # noqa: BLE001 - a lost reply is the caller's timeout, not our crash
            log.warning("could not send error reply: %s", exc)
