"""Alarm fault tests on real processes: a real nats-server (JetStream schedules) and Postgres.

1. kill -9 of the worker process that owns the objects, before their alarms are due: the
   surviving worker takes the partitions and runs every alarm, once, after its time.
2. nats-server stopped (SIGTERM, or kill -9) while alarms are pending, some due while it is
   down, and restarted on the same port with the same store: every alarm runs. The sweep is
   pushed out of the test's reach, so the wake-ups must come from the JetStream store.
3. A schedule lost by JetStream (the alarm stream purged): the Postgres sweep runs the alarm,
   late by at least one sweep interval and at most about two.
4. A nats-server without JetStream: Worker.start() and `durable worker` refuse to start, naming
   the server's version.

Runs are read from Postgres (the Alarmer's "runs" key in do_storage), so the checks do not
depend on a client reconnecting after a fault.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from durable.client import Client, Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.embedded import SERVER_PINGS, EmbeddedNats, nats_server_binary
from durable.core.errors import ConfigError
from durable.core.settings import Settings
from durable.core.wire import partition_of, server_mapping
from durable.objects import Worker
from durable.objects.alarm_stream import AlarmStream, check_server

from tests.helpers.faults import ClusterWorker, owners, wait_balanced
from tests.helpers.settings import PARTITIONS, ROOT, make_settings, worker_env
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(120)


def now_ms() -> int:
    return int(time.time() * 1000)


async def stored_runs(conn: asyncpg.Connection, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """object id -> its recorded alarm runs (committed ones: read from do_storage)."""
    rows = await conn.fetch("SELECT object_id, value FROM do_storage WHERE object_id = ANY($1::text[]) "
                            "AND key = $2", ids, b"runs")
    found = {r["object_id"]: codec.unpack(bytes(r["value"])) for r in rows}
    return {oid: found.get(oid, []) for oid in ids}


async def wait_all_ran(conn: asyncpg.Connection, ids: list[str], timeout: float) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}

    async def all_ran() -> bool:
        nonlocal runs
        runs = await stored_runs(conn, ids)
        return all(runs.values())

    try:
        await assert_eventually(all_ran, timeout, "every alarm ran")
    except AssertionError:
        missing = [oid[:12] for oid, r in runs.items() if not r]
        alarms = await conn.fetch("SELECT object_id, partition, due_ms, retry_count FROM do_alarms "
                                  "WHERE object_id = ANY($1::text[])", ids)
        raise AssertionError(f"{len(missing)} of {len(ids)} alarms never ran within {timeout}s: {missing}; "
                             f"do_alarms still holds {[dict(r) for r in alarms]} (now {now_ms()})") from None
    return runs


def check_runs(runs: dict[str, list[dict[str, Any]]], due: dict[str, int], after_ms: int = 0) -> int:
    """Every object ran its alarm (first run: the scheduled time, no retry, not early, after
    ``after_ms``); returns the number of duplicate runs."""
    for oid, r in runs.items():
        assert r, f"{oid[:12]}: never ran"
        first = r[0]
        assert first["scheduled"] == due[oid], (oid[:12], first, due[oid])
        assert first["retry"] == 0 and first["is_retry"] is False, (oid[:12], first)
        assert first["at"] >= due[oid], f"{oid[:12]}: ran {due[oid] - first['at']} ms early"
        assert first["at"] >= after_ms, f"{oid[:12]}: ran at {first['at']}, before {after_ms}"
    return sum(len(r) - 1 for r in runs.values())


async def alarmers(env: Env, names: list[str]) -> list[Any]:
    return [env.ALARMERS.get_by_name(n) for n in names]


# ----- 1. kill -9 of the owner ----------------------------------------------------------------

@pytest.mark.fault
@pytest.mark.parametrize("how", ["kill9", "sigstop-then-kill9"])
async def test_alarms_of_a_killed_owner_run_on_the_worker_that_takes_over(
        how: str, settings: Settings, config: AppConfig, tmp_path: Path) -> None:
    """``kill9``: killed before any alarm is due. ``sigstop-then-kill9``: frozen before any is
    due, killed 1.5 s after the first was due: the server has pushed those wake-ups to the
    frozen process (unacknowledged, they come back only after ACK_WAIT), and no one owns the
    partitions until the kill; the new owner must run them from Postgres."""
    s = settings.model_copy(update={"lease_ttl": 2.0, "heartbeat_interval": 0.5})
    a = ClusterWorker(f"alarm-{how}-a", s, tmp_path, audit=False)
    b = ClusterWorker(f"alarm-{how}-b", s, tmp_path, audit=False)
    client = await Client.connect(s.model_copy(update={"retry_deadline": 10.0}), config)
    conn = await asyncpg.connect(s.database_url)
    try:
        await a.start()
        await b.start()
        await wait_balanced(s.database_url, s, [a.worker_id, b.worker_id], timeout=30)
        stubs = await alarmers(Env(client, config), [f"failover-{how}-{i}" for i in range(20)])
        ids = [st.id.hex for st in stubs]
        by_partition = {p: owner for p, (_, owner) in (await owners(conn)).items()}
        owner_of = {oid: by_partition[partition_of(oid, s.partitions)] for oid in ids}
        on_a = [oid for oid in ids if owner_of[oid] == a.worker_id]
        assert on_a and len(on_a) < len(ids), f"the objects should sit on both workers: {owner_of}"
        await asyncio.gather(*(st.runs() for st in stubs))  # instantiate them (warm, so arming is quick)

        # all due after the kill: the first ones before B can have taken A's partitions (a
        # heartbeat or so), the last ones seconds after B owns everything
        base = now_ms() + 1000
        due = {oid: base + 150 * i for i, oid in enumerate(ids)}
        await asyncio.gather(*(st.arm_at(due[st.id.hex]) for st in stubs))
        if how == "kill9":
            await a.kill9()
        else:
            a.pause()
        killed_ms = now_ms()
        assert killed_ms < base, f"arming took too long: stopped {killed_ms - base} ms after the first alarm was due"
        if how != "kill9":  # paused past the first due times (the fault's timing), then killed
            await asyncio.sleep((base + 1500 - now_ms()) / 1000)
            await a.kill9()

        runs = await wait_all_ran(conn, ids, timeout=40)
        await asyncio.sleep(2.0)  # a late duplicate would show up here
        runs = await stored_runs(conn, ids)
        duplicates = check_runs(runs, due, after_ms=killed_ms)
        late = sorted(runs[oid][0]["at"] - due[oid] for oid in on_a)
        taken = {r["partition"]: int(r["acquired_at"].timestamp() * 1000)
                 for r in await conn.fetch("SELECT partition, acquired_at FROM do_partitions")}
        in_gap = sum(due[oid] < taken[partition_of(oid, s.partitions)] for oid in on_a)
        print(f"{how} of the owner: {len(on_a)} of {len(ids)} alarms were the killed worker's, {in_gap} of them "
              f"due before the survivor took their partition; all ran (lateness of those "
              f"{late[0]}..{late[-1]} ms); duplicates: {duplicates}")
        # the killed worker ran none of them (it stopped before the first was due) and the survivor
        # never crashed; a run is committed atomically with the deletion of its alarm row, so a
        # second recorded run of one alarm would mean the generation check let a stale wake-up run
        assert duplicates == 0, {oid[:12]: len(r) for oid, r in runs.items() if len(r) > 1}
        assert {o for _, o in (await owners(conn)).values()} == {b.worker_id}
        assert await conn.fetchval("SELECT count(*) FROM do_alarms WHERE object_id = ANY($1::text[])", ids) == 0
    finally:
        await client.close()
        await conn.close()
        a.close()
        b.close()


# ----- 2. nats-server restarted with its store -----------------------------------------------

async def _stream_messages(url: str, name: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(name)).state.messages)
    finally:
        await nc.close()


@pytest.mark.fault
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
async def test_pending_alarms_run_after_nats_server_restarts_with_its_store(
        how: str, settings: Settings, config: AppConfig, tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "nats", partitions=PARTITIONS) as server:
        # the sweep is pushed out of reach: every wake-up must come from the JetStream store
        s = settings.model_copy(update={"nats_url": server.url, "alarm_sweep_interval": 600.0})
        worker = Worker(s, config)  # stopped here, before its server goes
        await worker.start()
        # the owner's own timers (alarm_timers.py) would run them on time with NATS down: off,
        # so that only the JetStream store can wake them
        await worker.alarms.timers.stop()
        client = await Client.connect(s, config)
        conn = await asyncpg.connect(s.database_url)
        try:
            await worker.wait_ready()
            env = Env(client, config)
            early = await alarmers(env, [f"down-{how}-{i}" for i in range(4)])
            later = await alarmers(env, [f"back-{how}-{i}" for i in range(4)])
            ids = [st.id.hex for st in early + later]
            base = now_ms() + 1000
            due = {st.id.hex: base + 500 + 300 * i for i, st in enumerate(early)}  # while the server is down
            due |= {st.id.hex: base + 5000 + 300 * i for i, st in enumerate(later)}  # after it is back
            for st in early + later:
                await st.arm_at(due[st.id.hex])
            await client.close()
            stream_name = f"DURABLE_ALARMS_{s.deployment_key}"

            async def scheduled() -> bool:
                return await _stream_messages(server.url, stream_name) >= len(ids)

            await assert_eventually(scheduled, 10, "all schedules are in the stream")
            port = server.port
            if how == "sigterm":
                await server.stop()
            else:
                proc, server.process = server.process, None
                assert proc is not None
                proc.kill()
                await asyncio.to_thread(proc.wait)
            stopped_ms = now_ms()
            assert stopped_ms < min(due.values()), "the server was stopped after the first alarm was due"
            # down until the early alarms are overdue (the fault's length): nothing could wake them,
            # so they have not run
            await asyncio.sleep(max(0.0, (base + 2500 - now_ms()) / 1000))
            assert not any((await stored_runs(conn, [st.id.hex for st in early])).values())
            await server.start()
            restarted_ms = now_ms()
            assert server.port == port, "EmbeddedNats came back on another port"
            assert restarted_ms < min(due[st.id.hex] for st in later)

            runs = await wait_all_ran(conn, ids, timeout=25)
            await asyncio.sleep(1.5)  # a late duplicate would show up here
            runs = await stored_runs(conn, ids)
            duplicates = check_runs({st.id.hex: runs[st.id.hex] for st in early},
                                    {st.id.hex: due[st.id.hex] for st in early}, after_ms=restarted_ms)
            duplicates += check_runs({st.id.hex: runs[st.id.hex] for st in later},
                                     {st.id.hex: due[st.id.hex] for st in later})
            early_late = [runs[st.id.hex][0]["at"] - restarted_ms for st in early]
            later_late = [runs[st.id.hex][0]["at"] - due[st.id.hex] for st in later]
            print(f"nats-server {how} + restart: down {restarted_ms - stopped_ms} ms; overdue alarms ran "
                  f"{min(early_late)}..{max(early_late)} ms after the restart, the others "
                  f"{min(later_late)}..{max(later_late)} ms after their time; duplicates: {duplicates}")
            # one worker, which never crashed: a second recorded run would be a stale wake-up run
            assert duplicates == 0, {oid[:12]: len(r) for oid, r in runs.items() if len(r) > 1}
        finally:
            await client.close()
            await conn.close()
            await worker.stop(grace=2)


# ----- 3. a schedule lost by JetStream: the Postgres sweep --------------------------------------

@pytest.mark.fault
@pytest.mark.parametrize("by", ["sweep", "timer"])
async def test_an_alarm_whose_schedule_jetstream_lost_still_runs(
        start_worker: WorkerFactory, env: Env, settings: Settings, nats_server: EmbeddedNats, by: str) -> None:
    """"sweep": the owner's timers off, the sweep (every second) runs it once it is overdue;
    "timer": the sweep out of reach (600 s), the owner's own timer runs it."""
    interval = 1.0 if by == "sweep" else 600.0
    # a deployment key of its own: its alarm stream is this test's alone to purge
    key = random.randrange(100_000, 2**31 - 1)
    s = settings.model_copy(update={"deployment_key": key, "alarm_sweep_interval": interval})
    worker = await start_worker(deployment_key=key, alarm_sweep_interval=interval)
    if by == "sweep":
        await worker.alarms.timers.stop()

    async def attached() -> bool:
        # taking a partition re-publishes the schedules due soon: a reconcile that ran after the
        # purge would restore the wake-up, and the sweep would not be what runs the alarm
        return bool(worker.parts) and not any(t.get_name().startswith("alarm-attach") for t in worker.alarms.tasks)

    await assert_eventually(attached, 10, "every partition's alarms are reconciled")
    lost, kept = env.ALARMERS.get_by_name("lost-schedule"), env.ALARMERS.get_by_name("kept-schedule")
    nc = await nats.connect(nats_server.url)
    conn = await asyncpg.connect(s.database_url)
    try:
        js = nc.jetstream()
        stream = AlarmStream(nc, s)
        due = {lost.id.hex: await lost.arm(2500), kept.id.hex: await kept.arm(2500)}
        subject = stream.subjects.schedule(partition_of(lost.id.hex, s.partitions), lost.id.hex)

        async def published() -> bool:
            try:
                await js.get_last_msg(stream.name, subject)
                return True
            except nats.js.errors.NotFoundError:
                return False

        await assert_eventually(published, 5, "the schedule is in the stream")
        await js.purge_stream(stream.name, subject=subject)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg(stream.name, subject)
        assert now_ms() < due[lost.id.hex], "purged too late: the wake-up may have fired already"

        runs = await wait_all_ran(conn, list(due), timeout=15)
        await asyncio.sleep(1.5)  # a late duplicate would show up here
        runs = await stored_runs(conn, list(due))
        assert check_runs(runs, due) == 0, runs
        lateness = runs[lost.id.hex][0]["at"] - due[lost.id.hex]
        print(f"purged schedule: the {by} ran the alarm {lateness} ms late (sweep interval {interval}s); "
              f"the unpurged one ran {runs[kept.id.hex][0]['at'] - due[kept.id.hex]} ms late")
        if by == "timer":
            assert worker.alarms.timers.fired >= 2  # (nothing else could have run the purged one)
            return
        # the sweep runs only alarms overdue by more than its interval: so it was the sweep
        assert lateness >= interval * 1000, f"ran {lateness} ms late: not by the sweep?"
        # ... and it did so within about two intervals (generous: a slow machine)
        assert lateness <= 2 * interval * 1000 + 4000, f"ran {lateness} ms late"
        assert await conn.fetchval("SELECT count(*) FROM do_alarms") == 0
    finally:
        await nc.close()
        await conn.close()


# ----- 4. a nats-server without JetStream -------------------------------------------------------

class NatsWithoutJetStream(EmbeddedNats):
    """The same nats-server binary, started without a jetstream block."""

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(f"server_name: {self.name}\nlisten: 127.0.0.1:{self.port or -1}\n{SERVER_PINGS}"
                        f"mappings = {{\n  {server_mapping(self.partitions)}\n}}\n")
        return conf


def _server_version() -> str:
    out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"v(\d+\.\d+\.\d+)", out)
    assert m, out
    return m.group(1)


async def test_a_worker_refuses_a_nats_server_without_jetstream(
        database_url: str, config: AppConfig, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    version = _server_version()
    async with NatsWithoutJetStream(tmp_path / "plain", partitions=PARTITIONS) as server:
        s = make_settings(server.url, database_url)
        # check_server against real connections: refused here, accepted on a JetStream server
        nc = await nats.connect(server.url)
        try:
            assert not nc._server_info.get("jetstream")
            with pytest.raises(ConfigError):
                check_server(nc)
        finally:
            await nc.close()
        nc = await nats.connect(nats_server.url)
        try:
            check_server(nc)
        finally:
            await nc.close()

        worker = Worker(s, config)
        try:
            with pytest.raises(ConfigError) as err:
                await worker.start()
        finally:
            if getattr(worker, "nc", None) is not None:
                await worker.nc.close()
            if getattr(worker, "pool", None) is not None:
                await worker.pool.close()
        message = err.value.message
        assert "JetStream" in message and version in message, message
        conn = await asyncpg.connect(database_url)
        try:  # it took no partition on its way out (it stops before even creating the schema)
            if await conn.fetchval("SELECT to_regclass('do_partitions')") is not None:
                assert await conn.fetchval("SELECT count(*) FROM do_partitions WHERE owner IS NOT NULL") == 0
        finally:
            await conn.close()

        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "durable.cli", "worker"], env=worker_env(s),
            cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "configuration error" in proc.stderr, proc.stderr[-2000:]
        assert f"the NATS server (version {version}) runs without JetStream" in proc.stderr, proc.stderr[-2000:]
        assert "started" not in proc.stdout


# No check of the version rule (nats-server < 2.12 is refused): check_server() reads the version
# from a connected nats.NATS, so testing it would take a fake client or a fake server.
