"""Streams into objects: JetStream messages delivered to objects in stream order per object, once
in effect, retried and then parked (services/objects/subscriptions.py, messages.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from durable.core import codec
from durable.core.config import load_config
from durable.core.errors import ConfigError, ObjectReset, OutOfOrder, UnknownMethod
from durable.core.settings import Settings
from durable.core.wire import IDEMPOTENCY_HEADER
from durable.objects import Worker
from durable.objects.messages import Message, encode_message, message_key
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.helpers.settings import ROOT, worker_env
from tests.helpers.streams import StreamApp, add_stream, remove, write_app
from tests.helpers.waiting import assert_eventually
from tests.helpers.wire import json_view, validate

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start(settings: Settings, raw_nc: NatsClient) -> AsyncIterator[StartWorker]:
    """Start an in-process worker of a StreamApp (short ack wait, quick retries); stopped, and the
    app's stream removed, at teardown."""
    workers: list[Worker] = []
    apps: list[StreamApp] = []

    async def factory(app: StreamApp, **overrides: Any) -> Worker:
        apps.append(app)
        s = settings.model_copy(update={"config_file": app.path, "subscription_ack_wait": 2.0,
                                        "subscription_retry_base": 0.05, **overrides})
        worker = Worker(s, load_config(app.path))
        await worker.start()
        workers.append(worker)
        await worker.wait_ready()
        return worker

    yield factory
    for w in workers:
        if not w.draining:  # (a test may have stopped it)
            await w.stop()
    for app in apps:
        await remove(raw_nc, app, settings.deployment_key)


async def publish(nc: NatsClient, subject: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
    ack = await nc.jetstream().publish(subject, json.dumps(body).encode(), headers=headers)
    return int(ack.seq)


async def state(worker: Worker, name: str) -> dict[str, Any]:
    """The object's tally; a read queued behind a failing handler's reset is asked again."""
    while True:
        try:
            result: dict[str, Any] = await worker.env.TALLIES.get_by_name(name).state()
            return result
        except ObjectReset:
            continue


async def cli(settings: Settings, app: StreamApp, *args: str) -> tuple[int, str, str]:
    """Run ``durable <args>`` against this deployment; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "durable.cli", *args, cwd=ROOT,
        env=worker_env(settings, DURABLE_CONFIG_FILE=str(app.path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_each_object_gets_its_messages_in_stream_order_once_also_across_retries(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    await add_stream(raw_nc, app)
    worker = await start(app)
    names = ["a", "b", "c", "d"]
    sent: dict[str, list[int]] = {n: [] for n in names}
    for i in range(48):
        name = names[i % 4]
        # every fifth message fails its first attempt: the object's later ones wait for its retry
        body = {"fail_times": 1} if i % 5 == 0 else {}
        sent[name].append(await publish(raw_nc, app.subject(name), body))

    async def all_applied() -> bool:
        counts = [(await state(worker, n))["count"] for n in names]
        return counts == [len(sent[n]) for n in names]

    await assert_eventually(all_applied, 30, "every message applied")
    for n in names:
        got = await state(worker, n)
        assert got["seqs"] == sent[n], f"object {n} applied {got['seqs']}, the stream had {sent[n]}"
        assert got["last_subject"] == app.subject(n)


async def test_a_poison_message_is_parked_after_its_attempts_while_other_objects_flow_and_replays_by_cli(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path, settings: Settings) -> None:
    app = write_app(tmp_path, max_attempts=3)
    await add_stream(raw_nc, app)
    worker = await start(app)
    poison = await publish(raw_nc, app.subject("sick"), {"poison": True}, headers={"Trace": "t-1"})
    for _ in range(5):
        await publish(raw_nc, app.subject("well"), {})

    async def well_done() -> bool:
        return (await state(worker, "well"))["count"] == 5

    await assert_eventually(well_done, 20, "the other object's messages applied")

    async def parked() -> str | None:
        code, out, err = await cli(settings, app, "parked", "ls", app.subscription, "--json")
        assert code == 0, err
        rows = json.loads(out)
        return rows[0] if rows else None

    row: Any = await assert_eventually(parked, 30, "the poison message parked")
    assert row["seq"] == poison and row["subject"] == app.subject("sick") and row["attempts"] == 3
    assert "ValueError: poison pill" in row["reason"] and "after 3 attempts" in row["reason"]
    assert row["headers"] == {"Trace": "t-1"} and json.loads(row["data"]) == {"poison": True}
    # the failed attempts' writes were discarded with the instance: nothing of them was applied
    assert (await state(worker, "sick"))["count"] == 0

    code, out, _ = await cli(settings, app, "subscriptions", "ls", "--json")
    assert code == 0
    (listed,) = json.loads(out)
    assert listed["name"] == app.subscription and listed["parked"] == 1 and listed["unacked"] == 0

    await worker.env.TALLIES.get_by_name("sick").heal()
    code, out, err = await cli(settings, app, "parked", "replay", app.subscription, "--seq", str(poison))
    assert code == 0, err
    assert "1 replayed" in out

    async def healed() -> bool:
        return (await state(worker, "sick"))["count"] == 1

    await assert_eventually(healed, 20, "the replayed message applied")
    code, out, _ = await cli(settings, app, "parked", "ls", app.subscription, "--json")
    assert json.loads(out) == []
    code, _, err = await cli(settings, app, "parked", "replay", app.subscription, "--seq", str(poison))
    assert code == 2 and "no parked message" in err
    code, _, err = await cli(settings, app, "parked", "ls", "nope")
    assert code == 2 and "no subscription named 'nope'" in err


async def test_a_subject_without_the_object_token_is_parked_at_once(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path, settings: Settings) -> None:
    app = write_app(tmp_path, subject="{prefix}.>", object_token=3)
    await add_stream(raw_nc, app)
    worker = await start(app)
    short = await publish(raw_nc, f"{app.prefix}.x", {})
    await publish(raw_nc, f"{app.prefix}.x.named", {})

    async def named() -> bool:
        return (await state(worker, "named"))["count"] == 1

    await assert_eventually(named, 20, "the message with a token applied")

    async def parked() -> Any:
        code, out, _ = await cli(settings, app, "parked", "ls", app.subscription, "--json")
        return json.loads(out) if code == 0 else None

    (row,) = await assert_eventually(parked, 20, "the message without a token parked")
    assert row["seq"] == short and "has no token 3" in row["reason"] and row["attempts"] == 1


async def test_a_message_over_the_request_limit_is_parked_at_once_and_the_next_one_flows(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path, settings: Settings) -> None:
    app = write_app(tmp_path)
    await add_stream(raw_nc, app)
    worker = await start(app, max_request_bytes=4096)
    big = await publish(raw_nc, app.subject("a"), {"pad": "x" * 8000})
    await publish(raw_nc, app.subject("a"), {})

    async def applied() -> bool:
        return (await state(worker, "a"))["count"] == 1

    await assert_eventually(applied, 20, "the message after the oversized one applied")

    async def parked() -> Any:
        code, out, _ = await cli(settings, app, "parked", "ls", app.subscription, "--json")
        return json.loads(out) if code == 0 else None

    (row,) = await assert_eventually(parked, 20, "the oversized message parked")
    assert row["seq"] == big and row["attempts"] == 1
    assert row["reason"].startswith("payload_too_large: request of ")
    assert "over the limit of 4096 bytes" in row["reason"]


async def test_a_recorded_sequence_does_not_run_again_and_an_older_one_never_runs_after_a_newer(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    await add_stream(raw_nc, app)
    worker = await start(app)
    tapped: list[Msg] = []

    async def note(m: Msg) -> None:
        tapped.append(m)

    tap = await raw_nc.subscribe(f"dop.*.Tally.*.msg.{app.subscription}", cb=note)
    first = await publish(raw_nc, app.subject("b"), {})  # a sequence that object a never gets
    s2 = await publish(raw_nc, app.subject("a"), {})
    await publish(raw_nc, app.subject("a"), {})

    async def applied() -> bool:
        return (await state(worker, "a"))["count"] == 2

    await assert_eventually(applied, 20, "a's messages applied")
    await tap.unsubscribe()
    # what the puller sent is what schemas/ says, keyed by subscription and sequence
    assert sorted(m.headers[IDEMPOTENCY_HEADER] for m in tapped if m.headers) == \
        [message_key(app.subscription, s) for s in (first, s2, s2 + 1)]
    for m in tapped:
        validate("stream_message.json", json_view(codec.unpack(m.data)))
    oid = worker.env.TALLIES.id_from_name("a")
    subject = worker.client.subject_base("Tally", oid.hex) + f"msg.{app.subscription}"

    async def deliver(seq: int) -> Any:
        msg = Message(app.subscription, app.subject("a"), b"{}", {}, seq, 1)
        return await worker.client.request(subject, codec.pack(encode_message(msg, "on_message", "a")),
                                           {IDEMPOTENCY_HEADER: message_key(app.subscription, seq)})

    await deliver(s2)  # a redelivery of a recorded sequence: answered, not run
    assert (await state(worker, "a"))["count"] == 2
    with pytest.raises(OutOfOrder, match=f"stream sequence {first} .* arrived after sequence"):
        await deliver(first)
    assert (await state(worker, "a"))["seqs"] == [s2, s2 + 1]
    with pytest.raises(UnknownMethod, match="'on_message' receives stream messages"):
        await worker.env.TALLIES.get_by_name("a").on_message(None)  # past the key and the guard: refused


async def test_a_puller_stopped_cleanly_hands_its_messages_to_the_next_in_order(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "durable.subscriptions")
    app = write_app(tmp_path)
    await add_stream(raw_nc, app)
    workers = [await start(app), await start(app)]

    def puller() -> Worker | None:
        leading = [w for w in workers if not w.draining and w.subscriptions.pullers]
        return leading[0] if len(leading) == 1 else None

    leader: Worker = await assert_eventually(puller, 10, "one worker pulling the subscription")
    sent: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(30):
        name = "ab"[i % 2]
        sent[name].append(await publish(raw_nc, app.subject(name), {"slow": 0.05}))
    await assert_eventually(lambda: leader.subscriptions.pullers[app.subscription][0].delivered >= 4, 20,
                            "the first messages delivered")
    await leader.stop()  # a drain: held messages go back, oldest first, before its partitions do
    (other,) = [w for w in workers if w is not leader]

    async def all_applied() -> bool:
        return [(await state(other, n))["count"] for n in "ab"] == [15, 15]

    await assert_eventually(all_applied, 30, "every message applied after the hand-over")
    for n in "ab":
        assert (await state(other, n))["seqs"] == sent[n]
    # the stopped puller gave back what it held, and the new one took all of it back before delivering
    assert other.subscriptions.pullers[app.subscription][0].delivered > 0
    assert re.search(r"subscription \S+: (\d+) of \1 pending messages back; delivering", caplog.text), caplog.text


async def test_a_stream_declared_in_durable_toml_is_created_at_start_up_and_an_existing_one_left_alone(
        start: StartWorker, raw_nc: NatsClient, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    with app.path.open("a") as f:
        f.write(f'\n[[streams]]\nname = "{app.stream}"\nsubjects = ["{app.prefix}.>"]\nmax_age = 3600\n')
    worker = await start(app)
    info = await raw_nc.jetstream().stream_info(app.stream)
    assert info.config.subjects == [f"{app.prefix}.>"] and info.config.max_age == 3600
    seq = await publish(raw_nc, app.subject("a"), {})

    async def applied() -> bool:
        return (await state(worker, "a"))["seqs"] == [seq]

    await assert_eventually(applied, 20, "the message applied through the declared stream")
    # a stream that exists is the app's: its settings are not changed to the declaration's
    await raw_nc.jetstream().update_stream(name=app.stream, subjects=[f"{app.prefix}.>"], max_age=60)
    await start(app)
    assert (await raw_nc.jetstream().stream_info(app.stream)).config.max_age == 60


async def test_a_missing_stream_stops_start_up_with_a_clear_error(start: StartWorker, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    with pytest.raises(ConfigError, match=f"stream '{app.stream}' does not exist; create it first"):
        await start(app)


async def test_a_handler_the_class_lacks_stops_start_up(settings: Settings, tmp_path: Path) -> None:
    app = write_app(tmp_path, handler="on_order")
    with pytest.raises(ConfigError, match=r"Tally \(binding TALLIES\) has no method on_order\(\)"):
        Worker(settings.model_copy(update={"config_file": app.path}), load_config(app.path))
