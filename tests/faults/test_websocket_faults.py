"""WebSocket fault tests on real processes: a real nats-server and Postgres, real uvicorn
gateways (in-process, or ``durable gateway`` subprocesses) and real ``websockets`` clients.

1. kill -9 of the worker owning an object with 100 sockets: no client socket drops; the next
   frame (sent while no one owns the object) is served by the worker that takes over, which
   finds all 100 sockets with their tags and attachments; a broadcast reaches all of them.
2. kill -9 of a ``durable gateway`` process: its clients see the connection drop, and the
   object gets ``websocket_close(1006, was_clean=False)`` for each socket within a few seconds
   (the workers' watch of gateway heartbeats); ``get_websockets()`` is empty after.
3. A broadcast to one room spread over two gateways reaches every socket, and costs exactly
   one NATS message per gateway (a tap on ``dgw.>`` counts them).
4. A text frame of invalid UTF-8 closes that socket with 1007; the object serves the others.
5. A client that vanishes without a close frame (TCP reset, a client process killed -9, or a
   frozen client that only the gateway's pings can find out): the object gets
   ``websocket_close(1006)`` with was_clean False within ~15 s. A close frame without a status
   code is a clean 1005.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from durable.client import Client, Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.embedded import free_port
from durable.core.settings import Settings
from durable.core.wire import gateway_subject, partition_of
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tests.helpers.faults import ClusterWorker, owners, wait_balanced
from tests.helpers.gateway import ask, inproc_gateway
from tests.helpers.settings import ROOT, worker_env
from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(120)


# ----- helpers ---------------------------------------------------------------------------------

class GatewayProcess:
    """``durable gateway`` in its own process (routing through tests/helpers/routes.py), to kill -9."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        env = worker_env(self.settings, DURABLE_ROUTES="tests.helpers.routes:fetch",
                         DURABLE_GATEWAY_PORT=str(self.port), DURABLE_HTTP_HOST="127.0.0.1",
                         DURABLE_GATEWAY_HEARTBEAT_INTERVAL=str(self.settings.gateway_heartbeat_interval))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "gateway"], env=env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # uvicorn listens once the lifespan (gateway.start) is done
            if self.proc.poll() is not None:
                raise RuntimeError(f"durable gateway exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise TimeoutError(f"durable gateway did not listen on {self.port} within {timeout}s")

    async def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def closes_of(stub: Any, n: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Until the object recorded ``n`` websocket_close events: (the events, seconds waited)."""
    started = time.monotonic()
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal found
        found = await stub.closes()
        return len(found) >= n

    try:
        await assert_eventually(enough, timeout, f"{n} websocket_close events")
    except AssertionError:
        raise AssertionError(f"the object recorded {len(found)} of {n} websocket_close events within "
                             f"{timeout}s: {found}") from None
    return found, time.monotonic() - started


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ----- 1. kill -9 of the owning worker ---------------------------------------------------------

@pytest.mark.fault
async def test_sockets_survive_a_kill9_of_the_worker_owning_their_object(
        settings: Settings, config: AppConfig, tmp_path: Path) -> None:
    s = settings.model_copy(update={"lease_ttl": 2.0, "heartbeat_interval": 0.5})
    a = ClusterWorker("ws-kill-a", s, tmp_path, audit=False)
    b = ClusterWorker("ws-kill-b", s, tmp_path, audit=False)
    client = await Client.connect(s, config)
    conn = await asyncpg.connect(s.database_url)
    clients: list[ClientConnection] = []
    n = 100
    try:
        await asyncio.gather(a.start(), b.start())
        await wait_balanced(s.database_url, s, [a.worker_id, b.worker_id], timeout=30)
        stub = Env(client, config).SOCKS.get_by_name("failover")
        partition = partition_of(stub.id.hex, s.partitions)
        async with inproc_gateway(s, config) as (gw, _):
            clients = list(await asyncio.gather(
                *(connect(f"{gw}/sock/failover?tags=c{i},g{i % 3}&user=u{i}") for i in range(n))))
            before = await ask(clients[0], {"op": "whoami"})
            assert before["count"] == n
            owner = (await owners(conn))[partition][1]
            victim, survivor = (a, b) if owner == a.worker_id else (b, a)
            assert owner == victim.worker_id

            await victim.kill9()
            killed, killed_at = time.monotonic(), time.time()
            # every client sends a frame at once, right after the kill (before the survivor has
            # taken the partition, most likely): the gateway retries each through the failover
            answers = await asyncio.gather(*(ask(c, {"op": "whoami"}, timeout=15) for c in clients))
            served_after = time.monotonic() - killed
            assert (await owners(conn))[partition][1] == survivor.worker_id
            taken_at = (await conn.fetchval("SELECT acquired_at FROM do_partitions WHERE partition = $1",
                                            partition)).timestamp()
            for i, me in enumerate(answers):  # each socket as the new owner sees it
                assert me["instance"] != before["instance"]
                assert me == {"tags": [f"c{i}", f"g{i % 3}"], "attachment": {"user": f"u{i}"}, "count": n,
                              "instance": answers[0]["instance"]}, (i, me)
            registered = sorted(await stub.sockets(), key=lambda r: r["attachment"]["user"])
            assert registered == sorted(({"tags": [f"c{i}", f"g{i % 3}"], "attachment": {"user": f"u{i}"}}
                                         for i in range(n)), key=lambda r: r["attachment"]["user"])

            await clients[n - 1].send(json.dumps({"op": "broadcast", "v": "after the kill"}))
            got = await asyncio.gather(*(asyncio.wait_for(c.recv(), 10) for c in clients))
            assert all(json.loads(m) == {"broadcast": "after the kill"} for m in got)
            # a tagged broadcast from the new owner: the tags it loaded are the ones accepted
            assert await stub.broadcast("g2 only", "g2") == len(range(2, n, 3))
            got = await asyncio.gather(*(asyncio.wait_for(clients[i].recv(), 10) for i in range(2, n, 3)))
            assert set(got) == {"g2 only"}
            dropped = [i for i, c in enumerate(clients) if c.state is not State.OPEN]
            assert not dropped, f"client sockets dropped by the failover: {dropped}"
            assert await stub.closes() == []
            print(f"kill -9 of the owner: {survivor.worker_id} took the partition {taken_at - killed_at:.2f}s "
                  f"later; {n} frames sent right after the kill were all served within {served_after:.2f}s; "
                  f"{n} sockets stayed open")
            await close_all(clients)
    finally:
        await close_all(clients)
        await client.close()
        await conn.close()
        a.close()
        b.close()


# ----- 2. kill -9 of a gateway -----------------------------------------------------------------

@pytest.mark.fault
async def test_a_killed_gateway_closes_its_sockets_with_1006_for_the_object(
        start_worker: WorkerFactory, settings: Settings, env: Env, tmp_path: Path) -> None:
    s = settings.model_copy(update={"gateway_timeout": 2.0, "gateway_heartbeat_interval": 0.5})
    await start_worker(gateway_timeout=2.0, gateway_heartbeat_interval=0.5)
    gwp = GatewayProcess(s, tmp_path / "gateway.log")
    clients: list[ClientConnection] = []
    n = 10
    try:
        await gwp.start()
        clients = [await connect(f"{gwp.url}/sock/lostgw?tags=t{i}") for i in range(n)]
        assert (await ask(clients[0], {"op": "whoami"}))["count"] == n
        stub = env.SOCKS.get_by_name("lostgw")

        await gwp.kill9()
        for c in clients:  # the TCP connection went with the process: no close frame
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(c.recv(), 5)
            assert c.close_code == 1006, c.close_code
        found, waited = await closes_of(stub, n, timeout=10)
        assert sorted(found, key=lambda r: int(r["tags"][0][1:])) == [
            {"code": 1006, "reason": "the gateway holding this WebSocket was lost", "clean": False, "tags": [f"t{i}"]}
            for i in range(n)]
        assert await stub.sockets() == []
        print(f"gateway killed: the object got websocket_close(1006, clean=False) for all {n} sockets "
              f"{waited:.2f}s later (gateway_timeout 2 s)")
        async def closed_once() -> bool:
            return len(await stub.closes()) == n

        await assert_stays(closed_once, 1.5, message="one close per socket")  # the watch's next rounds
    finally:
        await close_all(clients)
        gwp.close()


# ----- 3. one broadcast, one NATS message per gateway ------------------------------------------

class Tap:
    """A separate NATS connection counting messages per subject on ``dgw.>``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.nc: Any = None

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url, name="dgw-tap")

        async def on_msg(msg: Any) -> None:
            self.seen.append((msg.subject, msg.data))

        await self.nc.subscribe("dgw.>", cb=on_msg)
        await self.nc.flush()

    async def settle(self, quiet: float = 0.3) -> None:
        """Until no message arrived for ``quiet`` seconds (a silence is only seen by waiting it out)."""
        await self.nc.flush()
        count = -1
        while count != len(self.seen):
            count = len(self.seen)
            await asyncio.sleep(quiet)

    def take(self) -> list[tuple[str, bytes]]:
        taken, self.seen = self.seen, []
        return taken


async def test_a_broadcast_over_two_gateways_costs_one_nats_message_per_gateway(
        worker: Any, settings: Settings, config: AppConfig, env: Env) -> None:
    tap = Tap()
    await tap.start(settings.nats_url)
    per_gateway = 30
    clients: list[ClientConnection] = []
    try:
        async with inproc_gateway(settings, config) as (url_a, gw_a), \
                inproc_gateway(settings, config) as (url_b, gw_b):
            subjects = {gateway_subject(settings.deployment_key, gw.id): gw for gw in (gw_a, gw_b)}
            for _ in range(per_gateway):
                clients.append(await connect(f"{url_a}/sock/room2?tags=a"))
                clients.append(await connect(f"{url_b}/sock/room2?tags=b"))
            assert (await ask(clients[0], {"op": "whoami"}))["count"] == 2 * per_gateway
            assert len(gw_a.conns) == len(gw_b.conns) == per_gateway
            stub = env.SOCKS.get_by_name("room2")

            for how in ("rpc", "frame"):
                await tap.settle()
                tap.take()
                if how == "rpc":
                    assert await stub.broadcast("to everyone") == 2 * per_gateway
                    expected: Any = "to everyone"
                else:  # a client's frame, handled as ws.message, broadcasts to the room
                    await clients[1].send(json.dumps({"op": "broadcast", "v": "from b"}))
                    expected = {"broadcast": "from b"}
                got = await asyncio.gather(*(asyncio.wait_for(c.recv(), 5) for c in clients))
                assert all((m if how == "rpc" else json.loads(m)) == expected for m in got), got
                await tap.settle()
                seen = tap.take()
                per_subject = Counter(subject for subject, _ in seen)
                assert per_subject == dict.fromkeys(subjects, 1), (how, per_subject)
                for subject, data in seen:  # each names its gateway's sockets once, with the payload once
                    ops = codec.loads(data, False)["ops"]
                    assert len(ops) == 1 and ops[0][0] == "send", ops
                    assert sorted(ops[0][1]) == sorted(subjects[subject].conns), (how, subject)
            await close_all(clients)
    finally:
        await close_all(clients)
        await tap.nc.close()


# ----- 4. malformed frames ---------------------------------------------------------------------

async def test_a_text_frame_of_invalid_utf8_closes_that_socket_with_1007(
        worker: Any, settings: Settings, config: AppConfig, env: Env) -> None:
    async with inproc_gateway(settings, config) as (gw, _):
        async with connect(f"{gw}/sock/utf8?tags=good") as good, connect(f"{gw}/sock/utf8?tags=bad") as bad:
            assert await ask(bad, {"op": "echo", "v": 1}) == {"echo": 1}
            await bad.send(b'{"op": "echo", "v": "\xff\xfe"}', text=True)  # a TEXT frame, not UTF-8
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(bad.recv(), 5)
            assert bad.close_code == 1007, (bad.close_code, bad.close_reason)
            assert await ask(good, {"op": "echo", "v": "still served"}) == {"echo": "still served"}
            stub = env.SOCKS.get_by_name("utf8")
            found, _ = await closes_of(stub, 1, timeout=5)
            assert [(c["code"], c["tags"]) for c in found] == [(1007, ["bad"])], found
            assert await stub.sockets() == [{"tags": ["good"], "attachment": None}]
            assert (await ask(good, {"op": "whoami"}))["count"] == 1


# ----- 5. a client that vanishes without a close frame -----------------------------------------

CLIENT_SCRIPT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main():
    async with connect(sys.argv[1], ping_interval=None) as ws:
        await ws.send('{"op": "echo", "v": "ready"}')
        await ws.recv()
        print("ready", flush=True)
        await asyncio.sleep(3600)  # a frozen client: it holds the socket and never answers a ping

asyncio.run(main())
"""


class WrongCloseEvent(AssertionError):
    """The close reached the object, but not with the code or was_clean it should have."""


@pytest.mark.parametrize("how", [
    # the client's TCP connection is reset (transport aborted): the gateway sees it at once
    "reset",
    # a client process killed -9: its kernel closes the connection
    pytest.param("kill9", marks=pytest.mark.fault),
    # a frozen client process (SIGSTOP): its TCP connection stays up, only the gateway's
    # keepalive pings (every 5 s, 5 s timeout) find it gone
    pytest.param("frozen", marks=pytest.mark.fault),
])
async def test_a_client_gone_without_a_close_frame_is_closed_1006_for_the_object(
        how: str, worker: Any, settings: Settings, config: AppConfig, env: Env) -> None:
    name = f"vanish-{how}"
    proc: asyncio.subprocess.Process | None = None
    async with inproc_gateway(settings, config) as (gw, _):
        async with connect(f"{gw}/sock/{name}?tags=stays") as stays:
            try:
                gone: ClientConnection | None = None
                if how == "reset":
                    gone = await connect(f"{gw}/sock/{name}?tags=gone", ping_interval=None)
                else:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", CLIENT_SCRIPT, f"{gw}/sock/{name}?tags=gone",
                        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
                    assert proc.stdout is not None
                    assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"ready\n"
                assert (await ask(stays, {"op": "whoami"}))["count"] == 2
                if gone is not None:
                    gone.transport.abort()
                elif how == "kill9":
                    assert proc is not None
                    proc.kill()
                    await proc.wait()
                else:
                    assert proc is not None
                    proc.send_signal(signal.SIGSTOP)
                vanished = time.monotonic()
                stub = env.SOCKS.get_by_name(name)
                found, _ = await closes_of(stub, 1, timeout=16)
                took = time.monotonic() - vanished
                print(f"client gone ({how}): the object got websocket_close{tuple(found[0].values())} "
                      f"after {took:.2f}s")
                assert took < (5 if how != "frozen" else 15), took
                assert len(found) == 1 and found[0]["tags"] == ["gone"] and found[0]["clean"] is False, found
                assert await stub.sockets() == [{"tags": ["stays"], "attachment": None}]
                assert await ask(stays, {"op": "echo", "v": "here"}) == {"echo": "here"}
                if found[0]["code"] != 1006:
                    raise WrongCloseEvent(f"websocket_close code {found[0]['code']}, expected 1006: {found[0]}")
            finally:
                if proc is not None and proc.returncode is None:
                    proc.kill()  # a stopped process dies of SIGKILL too
                    await proc.wait()


async def test_a_close_frame_without_a_code_is_a_clean_1005_for_the_object(
        worker: Any, settings: Settings, config: AppConfig, env: Env) -> None:
    async with inproc_gateway(settings, config) as (gw, _):
        ws = await connect(f"{gw}/sock/nocode")
        assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}
        await ws.close(code=None)  # type: ignore[arg-type] - an empty close frame: no status code
        found, _ = await closes_of(env.SOCKS.get_by_name("nocode"), 1, timeout=5)
        assert len(found) == 1 and found[0]["code"] == 1005, found
        if found[0]["clean"] is not True:
            raise WrongCloseEvent(f"websocket_close(1005) with was_clean {found[0]['clean']}, expected True")
