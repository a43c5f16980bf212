"""The local dispatch path (services/objects/local.py): a Client given an in-process worker
(``client.local = worker.local``, as ``durable dev`` wires its router) hands the requests for
the partitions that worker serves straight to its Dispatcher. The answers, errors, gates and
hand-over behaviour must be those of the NATS path; ``worker.local.taken`` shows which path a
request took, so no test here passes by quietly going over NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from durable.client import Client, Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import DurableError, NotOwner
from durable.core.settings import Settings
from durable.core.wire import decode_reply, partition_of
from durable.objects import Worker
from durable.router.app import create_app
from durable.testing.app import serve_asgi

from tests.helpers import routes
from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory
from tests.objects.test_edge_cases import PATIENT, PartitionRowLock


@pytest.fixture
async def local_client(worker: Worker, settings: Settings, config: AppConfig) -> AsyncIterator[Client]:
    """A client whose requests go to ``worker`` in process when it serves their partition."""
    c = await Client.connect(settings, config)
    c.local = worker.local
    yield c
    await c.close()


@pytest.fixture
def local_env(local_client: Client, config: AppConfig) -> Env:
    return Env(local_client, config)


async def _outcome(call: Any) -> tuple[str, Any]:
    """("ok", value) or ("error", (class, code, status, message))."""
    try:
        return "ok", await call
    except DurableError as exc:
        return "error", (type(exc), exc.code, exc.status, exc.message)


async def test_local_calls_answer_as_the_nats_path(worker: Worker, local_env: Env, env: Env) -> None:
    before = worker.local.taken
    assert await local_env.COUNTERS.get_by_name("local-same").increment(2) == 2
    assert await env.COUNTERS.get_by_name("local-same").increment(3) == 5  # over NATS: the same object
    assert await local_env.COUNTERS.get_by_name("local-same").get() == 5
    value = {"b": b"\x00\xff", "n": [1, 2.5, None, True], "s": "text"}
    assert await local_env.PROBES.get_by_name("local-echo").echo(value, k="v") == \
        await env.PROBES.get_by_name("local-echo").echo(value, k="v")
    assert worker.local.taken == before + 3  # every call of local_env was taken in process


async def test_a_local_reply_shares_no_object_with_the_caller(worker: Worker, local_env: Env) -> None:
    """Copy semantics: the object keeps what it was given, not the caller's list."""
    probe = local_env.LIFECYCLES.get_by_name("local-copy")
    sent = [1, 2]
    got = await probe.remember(sent)
    sent.append(3)
    got.append(4)
    assert (await probe.state())["loaded"]["memory"] == [1, 2]


async def test_local_errors_are_the_nats_errors(start_worker: WorkerFactory, settings: Settings,
                                                config: AppConfig) -> None:
    worker = await start_worker(max_request_bytes=64 * 1024)
    local, remote = await Client.connect(settings, config), await Client.connect(settings, config)
    local.local = worker.local
    try:
        envs = [Env(local, config), Env(remote, config)]
        oversized = {"args": ["x" * 100_000]}
        over_nats_limit = b"\x00" * (local.nc.max_payload + 1)
        cases: list[tuple[str, Any]] = [
            ("unknown method", lambda e: e.COUNTERS.get_by_name("local-err").no_such_method()),
            ("event handler", lambda e: e.COUNTERS.get_by_name("local-err").alarm()),
            ("object exception", lambda e: e.LIFECYCLES.get_by_name("local-err").raise_plain()),
            ("bad return value", lambda e: e.PROBES.get_by_name("local-err").bad_return()),
            ("bad payload", lambda e: e._client.call(
                "Counter", e.COUNTERS.id_from_name("local-err").hex, "rpc.increment", b"\xc1")),
            ("wrong shape", lambda e: e._client.call(
                "Counter", e.COUNTERS.id_from_name("local-err").hex, "rpc.increment", codec.pack(5))),
            ("over max_request_bytes", lambda e: e._client.call(
                "Counter", e.COUNTERS.id_from_name("local-err").hex, "rpc.increment", codec.pack(oversized))),
            ("over NATS max_payload", lambda e: e._client.call(
                "Counter", e.COUNTERS.id_from_name("local-err").hex, "rpc.increment", over_nats_limit)),
            ("unknown verb", lambda e: e._client.call(
                "Counter", e.COUNTERS.id_from_name("local-err").hex, "nope", b"")),
        ]
        for what, make in cases:
            taken = worker.local.taken
            via_local = await _outcome(make(envs[0]))
            went_local = worker.local.taken > taken
            via_nats = await _outcome(make(envs[1]))
            assert via_local[0] == "error", (what, via_local)
            assert via_local == via_nats, what
            # the NATS limit is the client's own check, before either path: nothing taken
            assert went_local == (what != "over NATS max_payload"), what
        assert await envs[0].COUNTERS.get_by_name("local-err").get() == 0  # none of it ran
    finally:
        await local.close()
        await remote.close()


async def test_a_local_call_carries_the_trace_headers_and_the_name(worker: Worker, local_env: Env) -> None:
    """The name the id was made from travels as over NATS (checked against the id)."""
    probe = local_env.PROBES.get_by_name("local-named")
    assert await probe.whoami() == {"id": probe.id.hex, "name": "local-named"}


class _HandOverRace:
    """A LocalDispatch that lets a hand-over begin right after the worker took the request
    (before its handler ran) and calls it off once the refusal is sent, so the caller's retry
    finds the partition served again."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.raced = 0
        self.refused: list[Any] = []

    def dispatch(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> Any:
        future = self.worker.local.dispatch(subject, payload, headers)
        if future is not None and not self.raced:
            self.raced += 1
            state = self.worker.parts[int(subject.split(".")[1])]
            state.closing = True

            def called_off(done: asyncio.Future[Any]) -> None:
                self.refused.append(done.result())
                state.closing = False

            future.add_done_callback(called_off)
        return future


async def test_a_not_owner_answer_to_a_local_call_is_retried_and_runs_once(
        worker: Worker, settings: Settings, config: AppConfig) -> None:
    race = _HandOverRace(worker)
    c = await Client.connect(settings, config)
    c.local = race
    try:
        counter = Env(c, config).COUNTERS.get_by_name("local-race")
        assert await counter.increment() == 1
        assert await counter.get() == 1  # the refused attempt did not run
    finally:
        await c.close()
    assert race.raced == 1
    headers, body = race.refused[0]
    with pytest.raises(NotOwner):  # the refusal: what provably did not run, so it was retried
        decode_reply(headers, body)


async def test_a_partition_another_worker_serves_goes_over_nats(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, env: Env) -> None:
    """Two workers; the client knows only the first: the second's partitions are reached over
    NATS, the first's in process. During the hand-over (the second joins while calls flow) every
    call lands on the owner and every acknowledged increment is there afterwards."""
    first = await start_worker(**PATIENT)
    c = await Client.connect(settings, config)
    c.local = first.local
    counters = [Env(c, config).COUNTERS.get_by_name(f"local-move-{i}") for i in range(24)]
    acked = [0] * len(counters)
    stop = asyncio.Event()

    async def drive(i: int) -> None:
        while not stop.is_set():
            acked[i] = await counters[i].increment()

    drivers = [asyncio.create_task(drive(i)) for i in range(len(counters))]
    try:
        await assert_eventually(lambda: min(acked) >= 2, 15, "every counter incremented")
        second = await start_worker(**PATIENT)

        def balanced() -> bool:
            return bool(second.parts) and len(first.parts) + len(second.parts) == settings.partitions and \
                all(s.sub is not None and not s.closing for s in (*first.parts.values(), *second.parts.values()))

        await assert_eventually(balanced, 30, "the partitions shared by the two workers")
        marks = list(acked)
        await assert_eventually(lambda: all(a > m for a, m in zip(acked, marks, strict=True)), 15,
                                "every counter incremented after the hand-over")
    finally:
        stop.set()
        results = await asyncio.gather(*drivers, return_exceptions=True)
    try:
        assert [r for r in results if r is not None] == []  # no call failed during the hand-over
        moved = [i for i, s in enumerate(counters)
                 if partition_of(s.id.hex, settings.partitions) in second.parts]
        assert moved, "no counter's partition went to the second worker"
        for i in range(len(counters)):  # read over NATS, from whichever worker owns it now
            assert await env.COUNTERS.get_by_name(f"local-move-{i}").get() == acked[i]
        taken = first.local.taken
        for i in moved:
            await counters[i].get()
        assert first.local.taken == taken  # the second worker's objects: over NATS
        kept = next(i for i in range(len(counters)) if i not in moved)
        await counters[kept].get()
        assert first.local.taken == taken + 1
    finally:
        await c.close()


async def test_a_local_reply_waits_until_its_write_is_durable(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig) -> None:
    worker = await start_worker(**PATIENT)
    c = await Client.connect(settings, config)
    c.local = worker.local
    counter = Env(c, config).COUNTERS.get_by_name("local-gated")
    try:
        assert await counter.increment() == 1
        taken = worker.local.taken
        async with PartitionRowLock(settings, partition_of(counter.id.hex, settings.partitions)) as row:
            call = asyncio.create_task(counter.increment())
            await row.flush_waits()  # the increment ran; its flush waits behind our lock
            assert worker.local.taken == taken + 1
            await assert_stays(lambda: not call.done(), 1.0, "no reply before the write commits")
            await row.release()
            assert await asyncio.wait_for(call, 10) == 2
    finally:
        await c.close()


async def test_eviction_and_reset_behave_as_over_nats(start_worker: WorkerFactory, settings: Settings,
                                                      config: AppConfig) -> None:
    worker = await start_worker(idle_timeout=0.3)
    c = await Client.connect(settings, config)
    c.local = worker.local
    env = Env(c, config)
    try:
        counter = env.COUNTERS.get_by_name("local-evicted")
        assert await counter.increment(5) == 5
        evicted = worker.partitions.evicted
        await assert_eventually(lambda: worker.partitions.evicted > evicted, 10, "the idle counter evicted")
        assert await counter.increment() == 6  # a new instance read the stored value back
        # a failure inside block_concurrency_while resets the object, its error comes back as is
        life = env.LIFECYCLES.get_by_name("local-reset")
        boots = (await life.state())["loaded"]["boots"]
        kind, error = await _outcome(life.fail_in_block())
        assert kind == "error" and "failure inside block_concurrency_while" in error[3], error
        assert (await life.state())["loaded"]["boots"] == boots + 1  # constructed again after the reset
    finally:
        await c.close()


async def test_the_router_opts_in_to_its_in_process_worker(worker: Worker, settings: Settings,
                                                           config: AppConfig, env: Env) -> None:
    """create_app(local=...) as `durable dev` calls it: HTTP requests reach the worker in process."""
    app = create_app(settings, config, user_fetch=routes.fetch, local=worker.local)
    taken = worker.local.taken
    async with serve_asgi(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for expected in (1, 2, 3):
            response = await http.post("/counter/local-http/increment")
            assert response.status_code == 200, response.text
            assert response.json() == {"value": expected}
    assert worker.local.taken >= taken + 3


async def test_a_slow_local_call_times_out_as_over_nats_and_is_not_repeated(
        worker: Worker, settings: Settings, config: AppConfig, env: Env) -> None:
    """The caller gives up after DURABLE_REQUEST_TIMEOUT (RequestTimeout: it may have run); the
    object still finishes the call, once, and its late reply is dropped."""
    impatient = settings.model_copy(update={"request_timeout": 0.3})
    local, remote = await Client.connect(impatient, config), await Client.connect(impatient, config)
    local.local = worker.local
    reader = env.PROBES.get_by_name("local-slow")  # a patient caller

    async def ran(times: int) -> bool:
        return bool(await reader.storage("get", "n") == times)

    taken = worker.local.taken
    try:
        outcomes = []
        for times, c in enumerate((local, remote), start=1):
            probe = Env(c, config).PROBES.get_by_name("local-slow")
            outcomes.append(await _outcome(probe.slow_increment("n", 1000)))
            await assert_eventually(lambda t=times: ran(t), 10, "the timed-out call ran, once")
        assert outcomes[0][0] == "error" and outcomes[0][1][1] == "timeout", outcomes
        assert outcomes[0][1][:3] == outcomes[1][1][:3]  # the same class, code and status
        assert worker.local.taken == taken + 1  # the first went local, the second over NATS
        await assert_stays(lambda: ran(2), 0.5, "and neither was repeated")
    finally:
        await local.close()
        await remote.close()
