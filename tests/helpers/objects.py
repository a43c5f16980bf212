"""Object classes the tests bind (see durable.test.toml)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from durable.objects import AlarmInfo, DurableObject, Request, Response
from durable.objects.patterns import Counter as CounterPattern
from durable.objects.patterns import RateLimiter, Session, check_fence
from durable.objects.patterns.game import Game
from durable.objects.patterns.stream import StreamChannel
from durable.objects.patterns.transfer import Transfer

__all__ = ["Counter", "RateLimiter", "Session", "Probe", "Lifecycle"]

class Counter(CounterPattern):
    """The library's Counter with its events on: the tests' increments go through the outbox too."""

    EMIT_EVENTS = True


_STORAGE_OPS = {"get", "put", "delete", "delete_all", "list", "sync", "get_alarm", "set_alarm", "delete_alarm"}


class Probe(DurableObject):
    """Exposes storage and gate behaviour over RPC so tests can drive it from outside."""

    async def storage(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if op not in _STORAGE_OPS:
            raise ValueError(f"unknown storage op {op}")
        return await getattr(self.ctx.storage, op)(*args, **kwargs)

    async def echo(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    async def whoami(self) -> dict[str, Any]:
        return {"id": self.ctx.id.hex, "name": self.ctx.id.name}

    async def put_many_then_fail(self, entries: dict[str, Any]) -> None:
        await self.ctx.storage.put(entries)
        raise RuntimeError("handler failed after put")

    async def txn(self, writes: dict[str, Any], deletes: list[str], mode: str) -> Any:
        """mode: commit | rollback | raise"""
        async with self.ctx.storage.transaction() as txn:
            if writes:
                await txn.put(writes)
            for key in deletes:
                await txn.delete(key)
            seen = await txn.list()
            if mode == "rollback":
                txn.rollback()
            elif mode == "raise":
                raise KeyError("boom in transaction")
        return seen

    async def slow_increment(self, key: str, delay_ms: int = 0) -> int:
        """A read-modify-write with a real Postgres read in between (a cache miss)."""
        value = await self.ctx.storage.get(key) or 0
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        await self.ctx.storage.put(key, value + 1)
        return value + 1

    async def put_after(self, entries: dict[str, Any], delay_ms: int) -> None:
        """Wait (holding the input gate), then put a multi-key batch: one atomic write."""
        await asyncio.sleep(delay_ms / 1000)
        await self.ctx.storage.put(entries)

    async def call_other(self, binding: str, name: str, method: str, *args: Any) -> Any:
        stub = getattr(self.env, binding).get_by_name(name)
        return await getattr(stub, method)(*args)

    async def bad_return(self) -> Any:
        return {1, 2}

    # ----- events (ctx.emit, tests/objects/test_outbox.py) ----------------------------------

    async def emit(self, name: Any, payload: Any = None, headers: Any = None,
                   put: dict[str, Any] | None = None) -> None:
        if put:
            await self.ctx.storage.put(put)
        self.ctx.emit(name, payload, headers)

    async def emit_many(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            self.ctx.emit(name, {"i": i})

    async def emit_in_txn(self, name: str, key: str, mode: str) -> None:
        """mode: commit | rollback | raise (the transaction's put and emit go or stay together)."""
        async with self.ctx.storage.transaction() as txn:
            await txn.put(key, name)
            self.ctx.emit(name, {"key": key})
            if mode == "rollback":
                txn.rollback()
            elif mode == "raise":
                raise KeyError("boom in transaction")

    async def emit_then_abort(self, name: str, key: str) -> None:
        await self.ctx.storage.put(key, name)
        self.ctx.emit(name, {"key": key})
        self.ctx.abort("abort after emit")

    async def emit_then_fail(self, name: str, key: str) -> None:
        await self.ctx.storage.put(key, name)
        self.ctx.emit(name, {"key": key})
        raise RuntimeError("handler failed after emit")

    async def _private(self) -> str:
        return "secret"

    async def fetch(self, request: Request) -> Response:
        return Response.json_response({"method": request.method, "path": request.path, "body": request.text()})

    async def list_many(self, options: list[dict[str, Any]], puts: dict[str, Any] | None = None,
                        deletes: list[str] | None = None) -> list[Any]:
        """Apply the deletes and puts, then in the same event run list(**o) for each options dict.
        Each result is the listed dict, or ``{"error": message}`` if that list() call raised."""
        storage = self.ctx.storage
        if deletes:
            await storage.delete(deletes)
        if puts:
            await storage.put(puts)
        results: list[Any] = []
        for o in options:
            try:
                results.append(await storage.list(**o))
            except Exception as exc:  # noqa: BLE001 - reported to the test per call
                results.append({"error": f"{type(exc).__name__}: {exc}"})
        return results

    async def txn_list_many(self, options: list[dict[str, Any]], puts: dict[str, Any],
                            deletes: list[str]) -> list[Any]:
        """Inside a transaction that is rolled back at the end: write, then list(**o) for each options."""
        async with self.ctx.storage.transaction() as txn:
            if deletes:
                await txn.delete(deletes)
            if puts:
                await txn.put(puts)
            results = [await txn.list(**o) for o in options]
            txn.rollback()
        return results

    async def put_built(self, key: str, kind: str, batch: bool = False) -> None:
        """put() a value built inside the object, for types the RPC wire cannot carry."""
        values: dict[str, Any] = {"set": {1, 2}, "object": object(), "complex": 1j,
                                  "nested_set": {"a": [{1}]}}
        if batch:
            await self.ctx.storage.put({"ok": 1, key: values[kind]})
        else:
            await self.ctx.storage.put(key, values[kind])

    async def txn_ops(self, ops: list[list[Any]], mode: str = "commit") -> list[Any]:
        """Run [op, args, kwargs] calls on a transaction, returning each result.
        mode: commit | rollback | raise. An op that raises is reported as ``{"error": message}``
        and the transaction goes on."""
        results: list[Any] = []
        async with self.ctx.storage.transaction() as txn:
            for op, args, kwargs in ops:
                try:
                    result = getattr(txn, op)(*args, **kwargs)
                    results.append(await result if asyncio.iscoroutine(result) else result)
                except Exception as exc:  # noqa: BLE001 - reported to the test per op
                    results.append({"error": f"{type(exc).__name__}: {exc}"})
            if mode == "rollback":
                txn.rollback()
            elif mode == "raise":
                raise KeyError("boom in transaction")
        return results

    async def bump_memory(self) -> int:
        """Count calls in instance memory only: the count starts again at 1 if the object was rebuilt."""
        self.memory_count = getattr(self, "memory_count", 0) + 1
        return self.memory_count

    async def storage_ops(self, ops: list[list[Any]]) -> list[Any]:
        """Run [op, args, kwargs] ctx.storage calls in one event (so their writes share a batch),
        returning each result; an op that raises is reported as ``{"error": message}``."""
        results: list[Any] = []
        for op, args, kwargs in ops:
            if op not in _STORAGE_OPS:
                raise ValueError(f"unknown storage op {op}")
            try:
                results.append(await getattr(self.ctx.storage, op)(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - reported to the test per op
                results.append({"error": f"{type(exc).__name__}: {exc}"})
        return results

    async def put_during_reads(self, key: str, value: Any) -> Any:
        """Start a get() and a list() of ``key`` (cache misses that read Postgres), put ``value``
        while they wait, then return what get() and list() answer afterwards."""
        storage = self.ctx.storage
        await asyncio.gather(storage.get(key), storage.get([key]), storage.list(prefix=key),
                             storage.put(key, value))
        return {"get": await storage.get(key), "list": await storage.list(prefix=key)}


class Lifecycle(DurableObject):
    """Counts constructions and runs init under block_concurrency_while."""

    constructed = 0

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        Lifecycle.constructed += 1
        self.loaded: Any = None
        self.ready = ctx.block_concurrency_while(self._load)

    async def _load(self) -> None:
        self.loaded = await self.ctx.storage.get("state") or {"boots": 0}
        self.loaded["boots"] += 1
        await self.ctx.storage.put("state", self.loaded)
        if self.loaded.get("fail_init"):
            raise RuntimeError("init failed on purpose")

    async def state(self) -> Any:
        return {"loaded": self.loaded, "constructed": Lifecycle.constructed}

    async def set_fail_init(self, value: bool) -> None:
        self.loaded["fail_init"] = value
        await self.ctx.storage.put("state", self.loaded)

    async def fail_in_block(self) -> None:
        async def boom() -> None:
            raise ValueError("failure inside block_concurrency_while")

        await self.ctx.block_concurrency_while(boom)

    async def remember(self, value: Any) -> Any:
        self.loaded["memory"] = value
        return value

    async def raise_plain(self) -> None:
        raise LookupError("an ordinary handler error")


# ----- edge cases (tests/objects/test_edge_cases.py) ------------------------------------------


async def _until(condition: Any, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition()`` from inside a handler (a plain await: the input gate stays closed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.005)


class Edge(DurableObject):
    """Drives the edge cases of tests/objects/test_edge_cases.py. Those tests run the worker in the
    test's process and event loop, so they steer an object through ``Edge.event(tag)`` and read
    what it noted in ``Edge.notes[tag]`` (tags are unique per test)."""

    events: dict[str, asyncio.Event] = {}
    notes: dict[str, list[Any]] = {}
    timeouts: dict[str, asyncio.Timeout] = {}

    @classmethod
    def event(cls, tag: str) -> asyncio.Event:
        return cls.events.setdefault(tag, asyncio.Event())

    @classmethod
    def note(cls, tag: str, what: Any) -> None:
        cls.notes.setdefault(tag, []).append(what)

    async def ping(self) -> str:
        return "pong"

    async def get(self, key: str) -> Any:
        return await self.ctx.storage.get(key)

    async def put(self, key: str, value: Any) -> None:
        await self.ctx.storage.put(key, value)

    async def incr(self, key: str, tag: str | None = None) -> int:
        if tag is not None:
            Edge.note(tag, "incr entered")
        value = (await self.ctx.storage.get(key) or 0) + 1
        await self.ctx.storage.put(key, value)
        return value

    async def put_then_abort(self, key: str, value: Any, once_in_flight: bool = False) -> None:
        """Put, then ctx.abort(): at once (the write is dropped) or once its flush is in flight."""
        await self.ctx.storage.put(key, value)
        if once_in_flight:
            await _until(lambda: self.ctx.storage._output.flushing, "the flush of the put")
        self.ctx.abort("aborted by the test")

    async def put_then_wait_for_reset(self, key: str, value: Any) -> str:
        """Put, then wait (no outgoing call) until the object is reset under this running event."""
        await self.ctx.storage.put(key, value)
        await _until(lambda: self.ctx.storage.closed is not None, "the reset of the object")
        return "finished after the reset"

    async def put_then_call(self, key: str, value: Any, other: str) -> Any:
        """Put, then call another object: the call waits at the output gate for the put."""
        await self.ctx.storage.put(key, value)
        return await self.env.EDGES.get_by_name(other).ping()

    async def rmw_across_a_cancelled_call(self, tag: str, other: str) -> int:
        """A call cancelled while it waits at the output gate, then a read-modify-write of "n"
        that waits for the test in the middle: no other event may run meanwhile."""
        await self.ctx.storage.put("marker", tag)  # not durable while the test blocks the flush
        try:
            async with asyncio.timeout(0.05):
                await self.env.EDGES.get_by_name(other).ping()
        except TimeoutError:
            Edge.note(tag, "call cancelled")
        value = (await self.ctx.storage.get("n") or 0) + 1
        await Edge.event(tag).wait()
        await self.ctx.storage.put("n", value)
        return value

    async def wait_for(self, tag: str) -> str:
        Edge.note(tag, "callee waiting")
        await Edge.event(tag).wait()
        return "released"

    async def call_then_time_out(self, tag: str, other: str) -> str:
        """Call ``other.wait_for`` (the input gate is open meanwhile) under a timeout that the test
        fires while this event waits to close the gate again; note how many events were holding
        this object when the timeout reached the handler."""
        try:
            async with asyncio.timeout(None) as timeout:
                Edge.timeouts[tag] = timeout
                await self.env.EDGES.get_by_name(other).wait_for(f"{tag}-callee")
        except TimeoutError:
            Edge.note(tag, ("timed out while holding", getattr(self, "holding", 0)))
        return "done"

    async def hold(self, tag: str) -> str:
        """Hold the input gate (a plain await) until the test sets ``{tag}-hold``."""
        self.holding = getattr(self, "holding", 0) + 1
        Edge.note(tag, "holding")
        try:
            await Edge.event(f"{tag}-hold").wait()
        finally:
            self.holding -= 1
        return "held"

    async def committed(self, tag: str, object_id: str, key: str) -> bool:
        """Whether another object's ``key`` is committed in Postgres (read past its storage API)."""
        Edge.note(tag, "registry called")
        async with self.ctx._instance.runtime.store.pool.acquire() as conn:
            found = await conn.fetchval("SELECT count(*) FROM do_storage WHERE object_id = $1 AND key = $2",
                                        object_id, key.encode())
        return bool(found)

    async def read_racing_delete_all(self, key: str, op: str) -> dict[str, Any]:
        """A cache-missing get(key) or list() that is still reading Postgres when delete_all() runs;
        then what get and list answer."""
        storage = self.ctx.storage
        read = storage.get(key) if op == "get" else storage.list()
        await asyncio.gather(read, storage.delete_all())
        return {"get": await storage.get(key), "list": await storage.list()}

    async def spawn_late_put(self, tag: str, key: str, value: Any) -> None:
        """Leave a task behind that puts once the test sets ``tag``, and notes what became of the
        write: "put accepted" then "durable", or the name of the error it met."""

        async def late() -> None:
            await Edge.event(tag).wait()
            try:
                await self.ctx.storage.put(key, value)
                Edge.note(tag, "put accepted")
                await self.ctx.storage.sync()
            except Exception as exc:  # noqa: BLE001 - noted for the test
                Edge.note(tag, type(exc).__name__)
            else:
                Edge.note(tag, "durable")

        self._late = asyncio.create_task(late())

    async def put_when(self, tag: str, entries: dict[str, Any]) -> None:
        """Note "waiting", wait (holding the input gate) until the test sets ``tag``, then put
        ``entries`` as one batch."""
        Edge.note(tag, "waiting")
        await Edge.event(tag).wait()
        await self.ctx.storage.put(entries)

    async def incr_noted(self, key: str, tag: str, fail: bool = False) -> int:
        """Note "ran", increment ``key``; then raise ValueError if ``fail`` (the write stays)."""
        Edge.note(tag, "ran")
        value = (await self.ctx.storage.get(key) or 0) + 1
        await self.ctx.storage.put(key, value)
        if fail:
            raise ValueError(f"failed after writing {value}")
        return value

    async def incr_when(self, key: str, tag: str) -> int:
        """Note "ran", wait (holding the input gate) until the test sets ``tag``, then increment."""
        Edge.note(tag, "ran")
        await Edge.event(tag).wait()
        value = (await self.ctx.storage.get(key) or 0) + 1
        await self.ctx.storage.put(key, value)
        return value

    async def put_then_hold(self, key: str, value: Any, tag: str) -> str:
        """Put, note "put", then wait (a plain await, no outgoing call) until the test sets ``tag``."""
        await self.ctx.storage.put(key, value)
        Edge.note(tag, "put")
        await Edge.event(tag).wait()
        return "done"


class Booter(DurableObject):
    """Its constructor's block_concurrency_while writes, then calls an Edge that looks in Postgres
    for that write: the output gate lets the call out only once the write is committed."""

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        self.registry_saw_the_write: Any = None
        ctx.block_concurrency_while(self._boot)

    async def _boot(self) -> None:
        await self.ctx.storage.put("booted", True)
        registry = self.env.EDGES.get_by_name(f"{self.ctx.id.name}-registry")
        self.registry_saw_the_write = await registry.committed(self.ctx.id.name, self.ctx.id.hex, "booted")

    async def hello(self) -> Any:
        return self.registry_saw_the_write


class Alarmer(DurableObject):
    """Alarms under test. Its behaviour lives in storage (``plan``), so subprocess workers and
    new instances act the same; every run of ``alarm()`` is recorded in ``runs``."""

    async def arm(self, delay_ms: int) -> int:
        when = int(time.time() * 1000) + delay_ms
        await self.ctx.storage.set_alarm(when)
        return when

    async def arm_at(self, when: Any) -> None:
        await self.ctx.storage.set_alarm(when)

    async def get_alarm(self) -> int | None:
        return await self.ctx.storage.get_alarm()

    async def delete_alarm(self) -> None:
        await self.ctx.storage.delete_alarm()

    async def plan(self, plan: dict[str, Any]) -> None:
        await self.ctx.storage.put("plan", plan)

    async def runs(self) -> list[dict[str, Any]]:
        return await self.ctx.storage.get("runs") or []

    async def put_and_arm(self, key: str, value: Any, delay_ms: int) -> None:
        await self.ctx.storage.put(key, value)
        await self.ctx.storage.set_alarm(int(time.time() * 1000) + delay_ms)

    async def arm_in_txn(self, delay_ms: int, mode: str) -> None:
        """mode: commit | rollback | raise."""
        try:
            async with self.ctx.storage.transaction() as txn:
                await txn.put("txn", mode)
                await txn.set_alarm(int(time.time() * 1000) + delay_ms)
                if mode == "rollback":
                    txn.rollback()
                elif mode == "raise":
                    raise RuntimeError("roll back")
        except RuntimeError:
            pass

    async def wipe(self) -> None:
        await self.ctx.storage.delete_all()

    async def get(self, key: str) -> Any:
        return await self.ctx.storage.get(key)

    async def alarm(self, info: AlarmInfo) -> None:
        storage = self.ctx.storage
        runs = await storage.get("runs") or []
        run = {"scheduled": info.scheduled_time, "retry": info.retry_count, "is_retry": info.is_retry,
               "at": int(time.time() * 1000), "inside": await storage.get_alarm()}
        runs.append(run)
        await storage.put("runs", runs)
        plan = await storage.get("plan") or {}
        if plan.get("emit"):  # an event from an alarm (tests/objects/test_outbox.py)
            self.ctx.emit(plan["emit"], {"run": len(runs)})
        if plan.get("rearm_ms") and len(runs) <= plan.get("rearm_times", 1):
            await storage.set_alarm(int(time.time() * 1000) + plan["rearm_ms"])
        if plan.get("delete_inside"):
            await storage.delete_alarm()
        if len(runs) <= plan.get("fail_times", 0):
            raise RuntimeError(f"planned failure {len(runs)}")


class QuickLimiter(RateLimiter):
    """The RateLimiter pattern with a one-second window of 3 requests."""

    LIMIT = 3
    WINDOW_MS = 1000

    async def stored(self) -> dict[str, Any]:
        return await self.ctx.storage.list()

    async def alarm_at(self) -> int | None:
        return await self.ctx.storage.get_alarm()


class Sock(DurableObject):
    """WebSockets under test: its fetch accepts an upgrade (``?tags=a,b``, ``?refuse=403``), and
    each text frame is a JSON command; every websocket_close it sees is recorded in storage."""

    async def fetch(self, request: Request) -> Response:
        refuse = request.query_param("refuse")
        if refuse:
            return Response(f"refused by the object: {refuse}", int(refuse))
        if request.websocket is None:
            return Response("expected a WebSocket upgrade", 426)
        raw_tags = request.query_param("tags")
        tags = raw_tags.split(",") if raw_tags else []
        if request.query_param("many_tags"):
            tags = [f"t{i}" for i in range(int(request.query_param("many_tags") or 0))]
        self.ctx.accept_websocket(request.websocket, tags)
        user = request.query_param("user")
        if user:
            request.websocket.serialize_attachment({"user": user})
        await self.ctx.storage.put("accepted", (await self.ctx.storage.get("accepted") or 0) + 1)
        return Response(None, 101)

    async def websocket_message(self, ws: Any, message: str | bytes) -> None:  # noqa: C901 - a command table
        if isinstance(message, bytes):
            ws.send(message)
            return
        import json

        cmd = json.loads(message)
        op = cmd["op"]
        if op == "echo":
            ws.send(json.dumps({"echo": cmd.get("v")}))
        elif op == "seq":  # ordering: the object checks each frame follows the last
            last = await self.ctx.storage.get("seq") or 0
            await self.ctx.storage.put("seq", cmd["n"])
            if cmd["n"] != last + 1:
                await self.ctx.storage.put("out_of_order", True)
            if cmd.get("ack"):
                ws.send(json.dumps({"seq": cmd["n"]}))
        elif op == "broadcast":
            payload = json.dumps({"broadcast": cmd.get("v")})
            for other in await self.ctx.get_websockets(cmd.get("tag")):
                other.send(payload)
        elif op == "whoami":
            sockets = await self.ctx.get_websockets()
            ws.send(json.dumps({"tags": self.ctx.get_tags(ws), "attachment": ws.deserialize_attachment(),
                                "count": len(sockets), "instance": id(self)}))
        elif op == "attach":
            try:
                ws.serialize_attachment(cmd["v"])
                ws.send(json.dumps({"attached": True}))
            except ValueError as exc:
                ws.send(json.dumps({"error": str(exc)}))
        elif op == "close":
            ws.close(cmd.get("code", 1000), cmd.get("reason", ""))
        elif op == "auto":
            self.ctx.set_websocket_auto_response(cmd["req"], cmd["res"])
            ws.send(json.dumps({"auto": True}))
        elif op == "auto_ts":
            ws.send(json.dumps({"auto_ts": await self.ctx.get_websocket_auto_response_timestamp(ws)}))
        elif op == "put_then_send":  # the frame must wait for the write (output gate)
            await self.ctx.storage.put(cmd["key"], cmd["v"])
            ws.send(json.dumps({"sent": cmd["key"]}))
        elif op == "fail":
            raise RuntimeError("websocket_message failed on purpose")
        elif op == "send_error":
            try:
                ws.send(cmd.get("v") if cmd.get("kind") != "int" else 5)
            except (TypeError, ValueError) as exc:
                ws.send(json.dumps({"error": str(exc)}))

    async def websocket_close(self, ws: Any, code: int, reason: str, was_clean: bool) -> None:
        closes = await self.ctx.storage.get("closes") or []
        closes.append({"code": code, "reason": reason, "clean": was_clean, "tags": self.ctx.get_tags(ws)
                       if ws.state != "closed" else list(ws.tags)})
        await self.ctx.storage.put("closes", closes)

    async def closes(self) -> list[dict[str, Any]]:
        return await self.ctx.storage.get("closes") or []

    async def sockets(self) -> list[dict[str, Any]]:
        return [{"tags": list(ws.tags), "attachment": ws.deserialize_attachment()}
                for ws in await self.ctx.get_websockets()]

    async def broadcast(self, text: str, tag: str | None = None) -> int:
        sockets = await self.ctx.get_websockets(tag)
        for ws in sockets:
            ws.send(text)
        return len(sockets)

    async def get(self, key: str) -> Any:
        return await self.ctx.storage.get(key)


class Fenced(DurableObject):
    """A resource a Lock protects, in another object: every write carries the holder's fencing
    token, and check_fence refuses one older than any it has seen."""

    async def write(self, token: int, key: str, value: Any) -> None:
        await check_fence(self.ctx.storage, "resource", token)
        await self.ctx.storage.put(key, value)

    async def get(self, key: str) -> Any:
        return await self.ctx.storage.get(key)


class _CrashAfterDebit:
    """The accounts namespace, except that the source's withdrawal (the debit step) kills this
    process as soon as the account answered: the transfer never records that it debited, so the
    run that resumes it must debit again with the same operation id and move nothing twice."""

    def __init__(self, accounts: Any, source: str) -> None:
        self._accounts = accounts
        self._source = source

    def get_by_name(self, name: str) -> Any:
        stub = self._accounts.get_by_name(name)
        if name != self._source:
            return stub

        class Dying:
            async def withdraw(self, amount: int, op_id: str) -> Any:
                await stub.withdraw(amount, op_id)
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies between debit and credit

        return Dying()


class CrashingTransfer(Transfer):
    """A Transfer whose worker process dies right after the debit, where the environment says so
    (DURABLE_TEST_CRASH=1 in a `durable worker` subprocess); elsewhere an ordinary Transfer."""

    def _accounts(self) -> Any:
        accounts = super()._accounts()
        if os.environ.get("DURABLE_TEST_CRASH") != "1":
            return accounts
        return _CrashAfterDebit(accounts, "crash-source")


class QuickGame(Game):
    """The Game pattern with a forfeit a few seconds after a player drops, and no move clock."""

    FORFEIT_AFTER_MS = 3000
    MOVE_TIMEOUT_MS = 0


class ClockedGame(Game):
    """The Game pattern with a one-second move clock (and a forfeit too long to matter)."""

    FORFEIT_AFTER_MS = 600_000
    MOVE_TIMEOUT_MS = 1000


class ShortStream(StreamChannel):
    """A stream channel that keeps only 5 messages, so a test reaches the gaps quickly."""

    RETAIN = 5


class Fragile(DurableObject):
    """Its constructor refuses a malformed ``config`` in storage: every event fails until an
    operator repairs that state (``durable state put``)."""

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        self.config: dict[str, Any] = {}
        ctx.block_concurrency_while(self._load)

    async def _load(self) -> None:
        config = await self.ctx.storage.get("config")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"config must be a map, not {type(config).__name__}")
        self.config = config or {}

    async def get_config(self) -> dict[str, Any]:
        return self.config

    async def set_config(self, value: Any) -> None:
        await self.ctx.storage.put("config", value)
