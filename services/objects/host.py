"""The worker: owns partitions, receives their requests from NATS and runs the objects in them."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import asyncpg
import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from ..client import Client, Env
from ..client.client import ERROR_CODE_HEADER, ERROR_HEADER, NAME_HEADER, close_nats
from ..core import codec, db, telemetry
from ..core.config import AppConfig
from ..core.errors import (
    DurableError,
    InvalidId,
    InvalidRequest,
    NotOwner,
    ObjectReset,
    PayloadTooLarge,
    RemoteError,
    StorageUnavailable,
    UnknownMethod,
    UnknownNamespace,
    UnknownSocket,
)
from ..core.http import Request, Response
from ..core.ids import IdFactory, ObjectId, namespace_key
from ..core.settings import Settings
from ..core.subjects import partition_filter, partition_of, partition_queue
from .alarms import AlarmRow, Alarms, check_server, run_alarm
from .base import DurableObject
from .flusher import Flusher
from .instance import Instance
from .micro import MicroService
from .ownership import Ownership
from .websockets import (
    AUTO_RESPONSE_HEADER,
    GATEWAY_HEADER,
    OBJECT_HEADER,
    SOCKET_ID_HEADER,
    GatewayWatch,
    gateway_query_subject,
    gateway_subject,
    parse_event,
    split_ops,
)

log = logging.getLogger("durable.worker")

#: how long a released partition's subscription keeps refusing requests before it is dropped
HANDOVER_LINGER = 0.5

_READ_KEYS = "SELECT key, value FROM do_storage WHERE object_id = $1 AND key = ANY($2::bytea[])"
_READ_SOCKETS = (
    "SELECT socket_id, gateway, tags, attachment, auto_request, auto_response FROM do_sockets "
    "WHERE object_id = $1 ORDER BY accepted_at, socket_id"
)
_READ_ALARM = "SELECT scheduled_ms, due_ms, generation, retry_count FROM do_alarms WHERE object_id = $1"
_READ_RANGE = (
    "SELECT key, value FROM do_storage WHERE object_id = $1 AND key >= $2 "
    "AND ($3::bytea IS NULL OR key < $3) ORDER BY key {order} LIMIT $4"
)


@dataclass
class PartitionState:
    partition: int
    epoch: int
    sub: Subscription | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    #: requests received and not yet through run_event (a hand-over waits for them)
    pending: int = 0
    #: being handed over: new requests are refused with NotOwner (the caller retries)
    closing: bool = False
    #: objects whose overdue alarm a sweep already started
    alarm_sweeping: set[str] = field(default_factory=set)

    def busy(self) -> bool:
        return self.pending > 0 or any(i.inflight or (i.storage.has_unflushed and i.broken is None)
                                       for i in self.instances.values())


def _parse_rpc_payload(payload: Any) -> tuple[list[Any], dict[str, Any]]:
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


def _claimed_name(payload: Any, headers: dict[str, str]) -> str | None:
    """The name the caller made the id from: ``name`` in the payload (stubs), or the
    percent-encoded ``Do-Name`` header (raw publishers). Checked against the id later."""
    if isinstance(payload, dict) and "name" in payload:
        name = payload["name"]
        if not isinstance(name, str):
            raise InvalidRequest(f"'name' must be a string, not {type(name).__name__}")
        return name
    raw = _header(headers, NAME_HEADER)
    return unquote(raw) if raw is not None else None


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections only run our own statements and never change session state (the
    advisory locks live on the ownership connection), so the default reset query, a round
    trip on every release, is skipped."""


def _header(headers: dict[str, str], name: str) -> str | None:
    """A header by name, case-insensitively (NATS keeps the case the publisher used)."""
    value = headers.get(name)
    if value is None:
        lname = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lname), None)
    return value


class Worker:
    """An object host. Use as an async context manager; ``stop()`` hands everything over cleanly."""

    def __init__(self, settings: Settings, config: AppConfig, classes: dict[str, type] | None = None,
                 audit_commits: bool | None = None) -> None:
        self.settings = settings
        self.config = config
        self.classes = classes if classes is not None else config.load_classes()
        for name, cls in self.classes.items():
            if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
                raise TypeError(f"{name}: object classes must subclass DurableObject")
        self.worker_id = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.audit_commits = settings.audit_commits if audit_commits is None else audit_commits
        self.ids = {
            b.class_name: IdFactory(b.class_name, namespace_key(settings.id_secret, b.identity))
            for b in config.bindings
        }
        self.parts: dict[int, PartitionState] = {}
        self.flusher = Flusher(self, concurrency=settings.flush_concurrency)
        self.ownership = Ownership(settings, self.worker_id, self._on_acquired, self._on_lost, self._hand_over)
        self.micro = MicroService(self)
        self.alarms = Alarms(self)
        self.gateways = GatewayWatch(self)
        self.nc: nats.NATS
        self.pool: asyncpg.Pool
        self.env: Env
        self.client: Client
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self._last_request = 0.0

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        # bounded first connect with a clear error (DURABLE_NATS_CONNECT_TIMEOUT), reconnects for ever
        self.client = await Client.connect(self.settings, self.config, name=f"durable-worker:{self.worker_id}",
                                           pending_size=8 * 1024 * 1024)
        self.nc = self.client.nc
        try:
            check_server(self.nc)  # alarms need JetStream message schedules: refuse to start without
        except BaseException:
            await close_nats(self.nc)
            raise
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=2, max_size=8,
                                              reset=_keep_session, command_timeout=self.settings.lease_ttl)
        async with self.pool.acquire() as conn:
            await db.apply_schema(conn, self.settings.partitions)
            await db.apply_class_migrations(conn, self.config)
        self.env = Env(self.client, self.config)
        self.flusher.start()
        await self.micro.start()
        await self.alarms.start()
        await self.gateways.start()
        await self.ownership.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="sweeper")

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the desired partitions are owned and subscribed."""
        deadline = time.monotonic() + timeout
        want: set[int] = set()
        while time.monotonic() < deadline:
            want = self.ownership.desired()
            serving = {p for p, s in self.parts.items() if s.sub is not None}
            if self.ownership.live and want <= serving:
                await self.nc.flush()
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"worker owns {len(self.parts)} of the {len(want)} partitions assigned to it "
                           f"after {timeout}s")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking requests, finish in-flight events, flush, release the partitions."""
        if self._sweeper:
            self._sweeper.cancel()
        await self.alarms.withdraw()  # alarm wake-ups go to the other workers from now on
        states = list(self.parts.values())
        # stragglers can only be on their way if requests were flowing, or someone takes over
        linger = len(self.ownership.live) > 1 or time.monotonic() - self._last_request < 1.0
        await self._quiesce(states, grace)
        await self.flusher.stop()
        await self.ownership.stop()
        if linger:  # refuse (rather than drop) what is still routed here
            await self._linger(states)
        deadline = time.monotonic() + 2.0
        while self._tasks and time.monotonic() < deadline:  # the last refusals go out
            await asyncio.sleep(0.005)
        await self.alarms.stop()
        await self.gateways.stop()
        await self.micro.stop()
        await self.pool.close()
        await close_nats(self.nc)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- ownership callbacks -----------------------------------------------------------

    async def _on_acquired(self, partition: int, epoch: int) -> None:
        state = PartitionState(partition, epoch)
        self.parts[partition] = state

        async def on_msg(msg: Msg) -> None:
            self._last_request = time.monotonic()
            state.pending += 1
            task = asyncio.create_task(self._handle(state, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        state.sub = await self.nc.subscribe(
            partition_filter(partition), queue=partition_queue(partition), cb=on_msg,
            pending_msgs_limit=200_000, pending_bytes_limit=256 * 1024 * 1024,
        )
        self.alarms.attach(state)

    def _on_lost(self, partition: int, reason: str) -> None:
        state = self.parts.pop(partition, None)
        if state is None:
            return
        log.warning("stepping down from partition %d (epoch %d): %s", partition, state.epoch, reason)
        # ObjectReset, not NotOwner: these events may have run (and a flush may be in flight), so
        # the caller must not retry them blindly as it does a NotOwner that proves nothing ran
        error = ObjectReset(f"this worker stepped down from partition {partition} ({reason}); "
                            "the object was reset; writes not yet acknowledged may be lost")
        for inst in list(state.instances.values()):
            inst.fail(error)
        if state.sub is not None:
            sub, state.sub = state.sub, None
            task = asyncio.get_running_loop().create_task(self._unsubscribe(sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be gone; the server drops it then
            pass

    async def _hand_over(self, partition: int, grace: float = 5.0) -> None:
        """Give a partition to the worker it is now assigned to: refuse new requests (NotOwner,
        which callers retry), finish the events in flight, flush, then release the lock. The
        subscription stays a little longer, refusing what NATS still routes here, so that no
        request is dropped unanswered; callers see latency, not errors."""
        state = self.parts.get(partition)
        if state is None:
            return
        log.debug("handing over partition %d", partition)  # ownership logs one line for the lot
        await self._quiesce([state], grace)
        if self.parts.get(partition) is not state:
            return  # stepped down meanwhile
        del self.parts[partition]
        error = ObjectReset(f"partition {partition} was handed over to another worker; retry")
        for inst in list(state.instances.values()):
            inst.fail(error)
        await self.ownership.release(partition)
        await self._linger([state])

    async def _quiesce(self, states: list[PartitionState], grace: float) -> None:
        """Refuse new requests, then wait for those taken to finish and their replies to go out."""
        for state in states:
            state.closing = True
            if state.sub is not None:
                await self._withdraw(state.sub)
        deadline = time.monotonic() + grace
        while any(state.busy() for state in states) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await self.flusher.replies_sent()

    async def _withdraw(self, sub: Subscription) -> None:
        """Tell the server we want no more messages, but keep the subscription registered in
        the client: a request the server routed to us just before it saw the UNSUB can still
        arrive (even after a PING round trip), and nats-py drops messages of unknown
        subscriptions, which would leave the caller waiting for a timeout. Kept, it is refused
        with NotOwner and retried. (nats-py has no public call for this half-unsubscribe.)"""
        try:
            await self.nc._send_unsubscribe(sub._id)
        except Exception:  # noqa: BLE001 - no connection: the server drops our interest anyway
            pass

    async def _linger(self, states: list[PartitionState]) -> None:
        """Drop the withdrawn subscriptions once stragglers have had time to arrive and be refused."""
        await asyncio.sleep(HANDOVER_LINGER)
        for state in states:
            if state.sub is not None:
                sub, state.sub = state.sub, None
                await self._unsubscribe(sub)

    def step_down(self, partition: int, reason: str) -> None:
        self.ownership.step_down(partition, reason)

    def drop_instance(self, inst: Instance) -> None:
        state = self.parts.get(inst.partition)
        if state is not None and state.instances.get(inst.object_id) is inst:
            del state.instances[inst.object_id]

    # ----- storage reads (used by Storage) ----------------------------------------------

    async def read_keys(self, object_id: str, keys: list[bytes]) -> list[Any]:
        return await self._read(_READ_KEYS, object_id, keys)

    async def read_alarm(self, object_id: str) -> AlarmRow | None:
        rows = await self._read(_READ_ALARM, object_id)
        if not rows:
            return None
        r = rows[0]
        return AlarmRow(r["scheduled_ms"], r["due_ms"], r["generation"], r["retry_count"])

    async def read_sockets(self, object_id: str) -> list[Any]:
        return await self._read(_READ_SOCKETS, object_id)

    async def read_range(self, object_id: str, lo: bytes, hi: bytes | None, reverse: bool,
                         limit: int | None) -> list[Any]:
        return await self._read(_READ_RANGE.format(order="DESC" if reverse else "ASC"), object_id, lo, hi, limit)

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        """A storage read; Postgres trouble is the runtime's, not the object's: a retryable error."""
        try:
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"storage read failed: {type(exc).__name__}: {exc}") from None

    # ----- requests ----------------------------------------------------------------------

    def _instance(self, state: PartitionState, namespace: str, oid: str, name: str | None) -> Instance:
        inst = state.instances.get(oid)
        if inst is not None and inst.namespace == namespace:
            # a live object: still check a claimed name (cheap when it is the name it was made from)
            if name is not None and name != inst.ctx.id.name:
                if not self.ids[namespace].name_matches(oid, name):
                    raise InvalidRequest(f"{NAME_HEADER} {name!r} is not the name of object {oid}")
                inst.ctx.id.name = name  # woken by a nameless request first; now we know it
            return inst
        if partition_of(oid, self.settings.partitions) != state.partition:
            # a raw publisher picked the wrong partition: serving it here could give the object
            # a second live instance next to the one in its real partition
            raise InvalidRequest(f"object {oid[:80]!r} does not belong to partition {state.partition}")
        cls = self.classes.get(namespace)
        ids = self.ids.get(namespace)
        if cls is None or ids is None:
            raise UnknownNamespace(f"no Durable Object class {namespace!r} is bound here "
                                   f"(known: {sorted(self.classes)})")
        object_id = ids.from_string(oid)
        if inst is not None:  # instances are keyed by id: never hand one object's instance to another class
            raise InvalidId(f"Durable Object ID {oid} is live in namespace {inst.namespace!r}, "
                            f"not {namespace!r}")
        if name is not None:
            if not ids.name_matches(oid, name):
                raise InvalidRequest(f"{NAME_HEADER} {name!r} is not the name of object {oid}")
            object_id = ObjectId(oid, name)
        inst = Instance(self, state.partition, state.epoch, namespace, cls, object_id)
        state.instances[oid] = inst
        return inst

    # ----- WebSockets: frames out to gateways ----------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_to_gateways(self, outbox: dict[str, list[list[Any]]]) -> None:
        """Frames an object sent, past its output gate: one NATS message per gateway."""
        for gateway, ops in outbox.items():
            for chunk in split_ops(ops):
                subject = gateway_subject(self.settings.deployment_key, gateway)
                body = codec.dumps({"ops": chunk}, False)
                try:
                    if any(op[0] == "auto" for op in chunk):
                        # an auto-response applies to the frames that follow the event's reply:
                        # the gateway confirms it holds the pair before that reply goes out (the
                        # reply travels on another connection, which NATS does not order with this)
                        await self.nc.request(subject, body, timeout=2.0)
                    else:
                        await self.nc.publish(subject, body)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    log.warning("gateway %s did not confirm an auto-response change", gateway)
                except Exception as exc:  # noqa: BLE001 - a gateway we cannot reach has lost its sockets
                    log.warning("could not send to gateway %s: %s: %s", gateway, type(exc).__name__, exc)

    async def auto_response_timestamp(self, gateway: str, socket_id: str) -> int | None:
        try:
            msg = await self.nc.request(gateway_query_subject(self.settings.deployment_key, gateway),
                                        codec.dumps({"sid": socket_id}, False), timeout=2.0)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None  # the gateway is gone, and the socket with it
        value = codec.loads(msg.data, False)
        return value if isinstance(value, int) else None

    def instance_for(self, state: PartitionState, namespace: str, object_id: str) -> Instance:
        """The live instance of an object in ``state``'s partition (made if needed), for events
        the runtime delivers itself (alarms)."""
        return self._instance(state, namespace, object_id, None)

    def _handler(self, inst: Instance, verb: list[str], payload: Any,
                 headers: dict[str, str]) -> Callable[[Any], Awaitable[Any]]:
        cls = inst.cls
        if len(verb) == 2 and verb[0] == "ws":
            return self._socket_event(inst, verb[1], payload)
        if verb == ["alarm"]:  # a wake-up forwarded by the worker that received it
            if not isinstance(payload, dict) or not isinstance(payload.get("gen"), int):
                raise InvalidRequest("an alarm wake-up needs a map with an integer 'gen'")
            generation = payload["gen"]
            return lambda obj: run_alarm(inst, obj, generation)
        if len(verb) == 2 and verb[0] == "rpc":
            method = verb[1]
            if method.startswith("_"):
                raise UnknownMethod(f"method {method!r} is private: methods starting with '_' are not callable")
            if method in DurableObject.EVENT_HANDLERS:
                raise UnknownMethod(f"{method!r} is an event handler, delivered by the runtime; it is not "
                                    f"callable as an RPC method of {cls.__name__}")
            attr = getattr(cls, method, None)
            if attr is None or not callable(attr):
                raise UnknownMethod(f"{cls.__name__} has no RPC method {method!r}")
            args, kwargs = _parse_rpc_payload(payload)

            async def rpc(obj: Any) -> Any:
                result = getattr(obj, method)(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    result = await result
                return result

            return rpc
        if verb == ["fetch"]:
            return self._fetch_handler(inst, payload)
        raise InvalidRequest(f"unknown verb {'.'.join(verb)!r}: expected rpc.<method> or fetch")

    def _fetch_handler(self, inst: Instance, payload: Any) -> Callable[[Any], Awaitable[Any]]:
        """fetch(request); for a WebSocket upgrade from a gateway, request.websocket is the socket
        offered, and a 101 answer carries the accepting object's address back to the gateway."""
        cls = inst.cls
        fetch = getattr(cls, "fetch", None)
        if fetch is None:
            raise UnknownMethod(f"{cls.__name__} does not define fetch()")
        try:
            request = Request.from_wire(payload)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"malformed fetch request: {exc}") from None

        socket_id, gateway = request.headers.get(SOCKET_ID_HEADER), request.headers.get(GATEWAY_HEADER)
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
                if ws is not None and ws.state == "open":
                    inst.sockets.closed(ws.id)  # accepted, then failed: the client never connects
                raise
            if response.status == 101:
                if ws is None or ws.state != "open":
                    raise RemoteError("fetch() answered 101 without ctx.accept_websocket(request.websocket)"
                                      if ws is not None else
                                      "fetch() answered 101 to a request that is not a WebSocket upgrade",
                                      remote_type="TypeError")
                response.headers.set(OBJECT_HEADER, f"{inst.namespace}.{inst.object_id}")
                if inst.sockets.auto is not None:
                    response.headers.set(AUTO_RESPONSE_HEADER, codec.dumps(list(inst.sockets.auto), True).decode())
            elif ws is not None and ws.state == "open":
                inst.sockets.closed(ws.id)  # accepted, then refused: the client never connected
            return response.to_wire()

        return do_fetch

    def _socket_event(self, inst: Instance, kind: str, payload: Any) -> Callable[[Any], Awaitable[Any]]:
        """A gateway's event for one of this object's sockets: message, close or error."""
        if kind == "message":
            event = parse_event(payload, {"sid": str, "data": (str, bytes)})
        elif kind == "close":
            event = parse_event(payload, {"sid": str, "code": int, "reason": str, "clean": bool})
        elif kind == "error":
            event = parse_event(payload, {"sid": str, "error": str})
        else:
            raise InvalidRequest(f"unknown WebSocket event {kind!r}: expected ws.message, ws.close or ws.error")
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

    async def _handle(self, state: PartitionState, msg: Msg) -> None:
        try:
            await self._handle_request(state, msg)
        finally:
            state.pending -= 1

    async def _handle_request(self, state: PartitionState, msg: Msg) -> None:
        started = time.perf_counter()
        headers = msg.headers or {}
        as_json = (_header(headers, "Content-Type") or "").lower().startswith(codec.JSON_CONTENT_TYPE)
        tokens = msg.subject.split(".")
        namespace = tokens[2] if len(tokens) > 2 else "?"
        inst: Instance | None = None
        try:
            if (state.closing or self.parts.get(state.partition) is not state
                    or not self.ownership.owns(state.partition, state.epoch)):
                raise NotOwner(f"partition {state.partition} is not owned by this worker")
            if len(tokens) < 5:
                raise InvalidRequest(f"malformed subject {msg.subject!r}")
            if len(msg.data) > self.settings.max_request_bytes:
                raise PayloadTooLarge(f"request of {len(msg.data)} bytes is over the limit of "
                                      f"{self.settings.max_request_bytes} bytes")
            payload = codec.loads(msg.data, as_json)
            inst = self._instance(state, namespace, tokens[3], _claimed_name(payload, headers))
            handler = self._handler(inst, tokens[4:], payload, headers)
            trace_context = telemetry.extract(headers)
            if trace_context is None:
                ok, value, seq = await inst.run_event(handler)
            else:
                with telemetry.tracer.start_as_current_span(
                    f"{namespace} {'.'.join(tokens[4:])}", context=trace_context, kind=SpanKind.SERVER,
                    attributes={"do.partition": state.partition, "do.epoch": state.epoch,
                                "do.object_id": inst.object_id},
                ):
                    ok, value, seq = await inst.run_event(handler)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            await self._finish(state, msg, as_json, namespace, started, False, exc, None)
            return
        if inst.storage.is_durable(seq):
            await self._finish(state, msg, as_json, namespace, started, ok, value, None)
        elif inst.storage.closed is not None:
            # reset before its writes were durable (abort, failed flush): nothing will flush them
            error = ObjectReset("Durable Object was reset before its writes were confirmed durable (a flush "
                                f"already in flight may still commit them): {inst.storage.closed}")
            await self._finish(state, msg, as_json, namespace, started, ok, value, error)
        else:
            # the output gate: the flusher sends this reply once the writes before it commit
            inst.storage.reply_when_durable(
                seq, functools.partial(self._finish, state, msg, as_json, namespace, started, ok, value))

    async def _finish(self, state: PartitionState, msg: Msg, as_json: bool, namespace: str, started: float,
                      ok: bool, value: Any, flush_error: BaseException | None) -> None:
        """Send the reply (or error) of one event, once its writes are durable."""
        try:
            if flush_error is not None:
                raise flush_error
            if not ok:
                raise value
            try:
                body = codec.dumps(value, as_json)
            except (TypeError, ValueError, OverflowError) as exc:
                raise RemoteError(f"the return value cannot be sent: {exc}",
                                  remote_type=type(exc).__name__) from None
            if not self.ownership.owns(state.partition, state.epoch):
                return  # never reply from an instance whose lease lapsed
            if msg.reply:
                await self.nc.publish(msg.reply, body,
                                      headers={"Content-Type": codec.JSON_CONTENT_TYPE} if as_json else None)
            self.micro.record(namespace, time.perf_counter() - started, None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            error = exc if isinstance(exc, DurableError) else RemoteError(str(exc), remote_type=type(exc).__name__)
            self.micro.record(namespace, time.perf_counter() - started, error)
            # runtime errors carry no object state, so they are sent even after the lease lapsed
            # (a flush failure must reach its caller, not become a timeout); errors raised by
            # object code are state, and follow the success path's rule
            if isinstance(error, NotOwner | ObjectReset) or self.ownership.owns(state.partition, state.epoch):
                await self._reply_error(msg, error, as_json)

    async def _reply_error(self, msg: Msg, error: DurableError, as_json: bool) -> None:
        if not msg.reply:
            return
        # NATS trims header values: a blank message would leave the error header empty
        headers = {ERROR_HEADER: error.message.replace("\r", " ").replace("\n", " ").strip()[:1000].rstrip()
                   or error.code,
                   ERROR_CODE_HEADER: str(error.status)}
        if as_json:
            headers["Content-Type"] = codec.JSON_CONTENT_TYPE
        try:
            await self.nc.publish(msg.reply, codec.dumps({"error": error.to_wire()}, as_json), headers=headers)
        except Exception as exc:  # noqa: BLE001 - a lost reply is the caller's timeout, not our crash
            log.warning("could not send error reply: %s", exc)

    # ----- eviction ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        period = max(0.05, min(self.settings.idle_timeout / 2, 5.0))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for state in list(self.parts.values()):
                for inst in list(state.instances.values()):
                    if inst.idle and now - inst.last_active >= self.settings.idle_timeout:
                        # fail, not just forget: a task the object left running must not
                        # write next to the instance that replaces it
                        inst.fail(ObjectReset("Durable Object was evicted after being idle; "
                                              "this instance can no longer be used"))

    def live_objects(self) -> int:
        return sum(len(s.instances) for s in self.parts.values())
