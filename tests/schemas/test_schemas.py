"""Real traffic against schemas/: what durable's stubs put on NATS, and what a running worker
answers (success, fetch, errors; msgpack and JSON), captured on the wire.

The capture is a plain (non-queue) subscription on a connection of its own: NATS gives it a
copy of every message on ``dop.>`` and ``_INBOX.>`` while the worker's queue subscription and
the stub's inbox get theirs as usual, so nothing in the path is replaced or slowed down.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import nats
import pytest
from durable.client import Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.embedded import EmbeddedNats
from durable.core.errors import _REGISTRY, RemoteError, UnknownMethod
from durable.core.http import Request
from durable.core.settings import Settings
from durable.core.wire import ERROR_HEADER, NAME_HEADER, partition_of
from durable.objects import Worker
from nats.aio.client import Client as NatsClient

from tests.helpers.settings import PARTITIONS
from tests.helpers.waiting import assert_eventually
from tests.helpers.wire import (
    JSON_HEADERS,
    MICRO_DIR,
    SCHEMA_DIR,
    as_json,
    assert_error,
    assert_ok,
    decode_payload,
    load_schema,
    raw_request,
    schema_files,
    validate,
)

#: SHA-256 of each file of the NATS micro-services schemas, version 1, as nats-io/jsm.go publishes
#: them (schemas/micro/v1/) and as they were copied into schemas/nats-micro-v1/: the nats CLI
#: validates `nats micro` replies against exactly these, so the copies must not drift.
UPSTREAM_MICRO_SHA256 = {
    "README.md": "57000fba35df522deb83a48cd30230b6a0bb1288a6720f7ae617729d5ee7cc23",
    "info_response.json": "93da733839aae841a8cad3bd9aecfe9d4a58f8b657c5d802301e76d372aa4a1a",
    "ping_response.json": "867ee1769bcc69d0ca67aeeb88efb8785cf535e27adfbe5e6cd0123e338ed0d7",
    "stats_response.json": "7a91360dd2257d3250a520fe5f59a939835e6cca689dd2986bcfa78f6508b604",
}
_PARTITION_SUBJECT = re.compile(r"^dop\.(\d+)\.([A-Za-z0-9_-]+)\.([0-9a-f]{64})\.(rpc\.[A-Za-z0-9_-]+|fetch)$")


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this module's own: the taps below listen to whole subject spaces
    (``dop.>``, ``_INBOX.>``), which on the session's shared server also carry what earlier
    tests left running."""
    async with EmbeddedNats(tmp_path_factory.mktemp("schemas-nats"), partitions=PARTITIONS) as server:
        yield server


@pytest.fixture
async def tap(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url, name="wire-tap")
    yield nc
    await nc.close()


def test_every_schema_is_valid_json_schema() -> None:
    names = {p.name for p in schema_files()}
    assert {"rpc_request.json", "rpc_reply.json", "fetch_request.json", "fetch_response.json",
            "error_reply.json", "request_headers.json", "ping_response.json", "info_response.json",
            "stats_response.json"} <= names
    for path in schema_files():
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
        for example in schema.get("examples", []):
            validate(path.name, example)
    assert (SCHEMA_DIR / "README.md").exists()


def test_micro_schemas_are_unchanged_copies() -> None:
    assert sorted(p.name for p in MICRO_DIR.iterdir()) == sorted(UPSTREAM_MICRO_SHA256)
    for name, digest in UPSTREAM_MICRO_SHA256.items():
        assert hashlib.sha256((MICRO_DIR / name).read_bytes()).hexdigest() == digest, f"{name} differs from upstream"


def test_error_codes_and_statuses_match_the_error_classes() -> None:
    schema = load_schema("error_reply.json")
    codes = schema["properties"]["error"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted(_REGISTRY), "error_reply.json code enum is out of date"
    description = schema["properties"]["error"]["properties"]["code"]["description"]
    status_pattern = re.compile(load_schema("request_headers.json")["properties"]["Nats-Service-Error-Code"]["pattern"])
    for code, cls in _REGISTRY.items():
        assert f"{code} {cls.status}" in description, (code, cls.status)
        assert status_pattern.match(str(cls.status))


def test_schemas_refuse_what_the_worker_refuses() -> None:
    bad_rpc: list[object] = [{"args": 5}, {"kwargs": []}, {"args": [], "extra": 1}, "text", 7]
    for bad in bad_rpc:
        with pytest.raises(jsonschema.ValidationError):
            validate("rpc_request.json", bad)
    bad_fetch: list[object] = [{}, {"url": 5}, {"url": "/", "headers": [["a"]]}, {"url": "/", "body": 5}]
    for bad in bad_fetch:
        with pytest.raises(jsonschema.ValidationError):
            validate("fetch_request.json", bad)
    with pytest.raises(jsonschema.ValidationError):
        validate("error_reply.json", {"error": {"code": "nope", "type": "X", "message": "",
                                                "retryable": False, "overloaded": False}})
    with pytest.raises(jsonschema.ValidationError):
        validate("request_headers.json", {ERROR_HEADER: "boom"})  # the code header must come with it
    with pytest.raises(jsonschema.ValidationError):
        validate("stats_response.json", {"type": "io.nats.micro.v1.stats_response", "name": "durable",
                                         "id": "x", "version": "0.1.0", "started": "yesterday",
                                         "endpoints": []})


async def test_stub_traffic_matches_schemas(worker: Worker, env: Env, tap: NatsClient) -> None:
    requests = await tap.subscribe("dop.>")
    replies = await tap.subscribe("_INBOX.>")
    await tap.flush()  # the taps are registered before the first request

    counter = env.COUNTERS.get_by_name("schemas")
    probe = env.PROBES.get_by_name("schemas")
    anonymous = env.PROBES.get(env.PROBES.new_unique_id())
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)

    assert await counter.increment() == 1
    assert await counter.increment(5) == 6
    assert await counter.increment(by=2) == 8
    echoed = await probe.echo(b"\x00\xff", [1, "two"], when=when, nested={"k": None})
    assert echoed == {"args": [b"\x00\xff", [1, "two"]], "kwargs": {"when": when, "nested": {"k": None}}}
    assert (await anonymous.whoami())["name"] is None
    response = await probe.fetch(Request("https://example.com/p/q?x=1", method="post",
                                         headers=[("x-a", "1"), ("x-a", "2")], body=b"hello"))
    assert response.status == 200 and response.json()["body"] == "hello"
    with pytest.raises(UnknownMethod):
        await probe.nope()
    with pytest.raises(RemoteError):
        await counter.increment("five")
    calls = 8

    seen: dict[str, str] = {}  # reply subject -> verb
    ours = {counter.id.hex, probe.id.hex, anonymous.id.hex}
    others: list[str] = []
    while len(seen) < calls:
        try:
            msg = await requests.next_msg(timeout=5)
        except nats.errors.TimeoutError:
            pytest.fail(f"the tap saw {len(seen)} of our {calls} requests ({sorted(seen.values())}); "
                        f"other subjects: {others[:20]}")
        if not any(oid in msg.subject for oid in ours):
            others.append(msg.subject)
            continue  # not this test's: e.g. a close event an earlier test's gateway is still delivering
        m = _PARTITION_SUBJECT.match(msg.subject)
        assert m, msg.subject
        partition, namespace, oid, verb = m.groups()
        assert int(partition) == partition_of(oid, PARTITIONS)
        headers = msg.headers
        if headers is not None:
            validate("request_headers.json", headers)
            assert "Content-Type" not in headers  # stubs speak msgpack
        ns = env.by_class(namespace)
        assert ns is not None
        ns.id_from_string(oid)  # a valid id of that namespace
        payload = decode_payload(msg.data, headers)
        assert headers is None or NAME_HEADER not in headers  # stubs carry the name in the payload
        if oid == anonymous.id.hex:
            assert "name" not in payload
        else:
            assert payload["name"] == "schemas"
        validate("fetch_request.json" if verb == "fetch" else "rpc_request.json", payload)
        seen[msg.reply] = verb

    assert len(seen) == calls
    kinds = []
    while seen:
        msg = await replies.next_msg(timeout=5)
        if msg.subject not in seen:
            continue  # another inbox: e.g. the worker's own JetStream API replies (alarm consumers)
        verb = seen.pop(msg.subject)
        if msg.headers and ERROR_HEADER in msg.headers:
            code = decode_payload(msg.data, msg.headers)["error"]["code"]
            assert_error(msg, code, _REGISTRY[code].status)
            kinds.append(code)
            continue
        if msg.headers is not None:
            validate("request_headers.json", msg.headers)
        body = decode_payload(msg.data, msg.headers)
        validate("fetch_response.json" if verb == "fetch" else "rpc_reply.json", body)
        kinds.append(verb)
    assert not seen
    assert sorted(kinds) == sorted(["rpc.increment"] * 3 + ["rpc.echo", "rpc.whoami", "fetch",
                                                            "unknown_method", "remote"])


async def test_json_requests_and_replies_match_schemas(worker: Worker, env: Env,
                                                       raw_nc: NatsClient) -> None:
    oid = env.PROBES.id_from_name("json-wire").hex

    rpc = {"args": [{"$bytes": "AAE="}], "kwargs": {"at": {"$datetime": "2024-01-02T03:04:05+00:00"}}}
    validate("rpc_request.json", rpc)
    msg = await raw_request(raw_nc, f"do.Probe.{oid}.rpc.echo", as_json(rpc), JSON_HEADERS)
    assert msg.headers == JSON_HEADERS
    body = assert_ok(msg)
    validate("rpc_reply.json", body)
    assert body == {"args": [{"$bytes": "AAE="}], "kwargs": {"at": {"$datetime": "2024-01-02T03:04:05+00:00"}}}

    fetch = {"method": "PUT", "url": "https://example.com/a/b", "headers": [["x-y", "z"]], "body": "payload"}
    validate("fetch_request.json", fetch)
    msg = await raw_request(raw_nc, f"do.Probe.{oid}.fetch", as_json(fetch), JSON_HEADERS)
    body = assert_ok(msg)
    validate("fetch_response.json", body)
    assert body["status"] == 200
    assert ["content-type", "application/json"] in body["headers"]
    assert json.loads(base64.b64decode(body["body"]["$bytes"])) == {"method": "PUT", "path": "/a/b",
                                                                    "body": "payload"}

    # the same fetch in msgpack, with bytes and a header map
    fetch_mp = {"url": "https://example.com/c", "headers": {"a": "b"}, "body": b"raw"}
    validate("fetch_request.json", {**fetch_mp, "body": {"$bytes": "cmF3"}})
    msg = await raw_request(raw_nc, f"do.Probe.{oid}.fetch", codec.pack(fetch_mp))
    assert msg.headers is None
    body = assert_ok(msg)
    validate("fetch_response.json", body)


@pytest.mark.parametrize("json_request", [False, True])
async def test_error_replies_match_schemas(worker: Worker, env: Env, raw_nc: NatsClient,
                                           json_request: bool) -> None:
    headers = JSON_HEADERS if json_request else None
    counter = env.COUNTERS.id_from_name("errors").hex
    probe = env.PROBES.id_from_name("errors").hex

    def enc(value: object) -> bytes:
        return codec.dumps(value, json_request)

    cases = [
        (f"do.Counter.{counter}.rpc.nope", enc({}), "unknown_method", 404, "nope"),
        (f"do.Counter.{counter}.rpc._private", enc({}), "unknown_method", 404, "private"),
        (f"do.Nope.{counter}.rpc.increment", enc({}), "unknown_namespace", 404, "Nope"),
        (f"do.Counter.{'0' * 64}.rpc.increment", enc({}), "invalid_id", 400, "Counter"),
        (f"do.Counter.{counter}.rpc.increment", b"\xc1", "invalid_request", 400,
         "malformed JSON" if json_request else "malformed msgpack"),
        (f"do.Counter.{counter}.rpc.increment", enc({"args": ["x"]}), "remote", 500, "integer"),
        (f"do.Probe.{probe}.fetch", enc({"url": 5}), "invalid_request", 400, "fetch"),
        (f"do.Probe.{probe}.rpc.put_many_then_fail", enc([{"k": 1}]), "remote", 500, "handler failed"),
    ]
    for subject, payload, code, status, fragment in cases:
        msg = await raw_request(raw_nc, subject, payload, headers)
        assert_error(msg, code, status, fragment, json_reply=json_request)
        body = decode_payload(msg.data, msg.headers)
        assert body["error"]["retryable"] is False and body["error"]["overloaded"] is False


async def _drain(sub: Any, quiet: float = 0.5) -> list[Any]:
    """Every message the tap got until it has been quiet for ``quiet`` seconds."""
    got = []
    while True:
        try:
            got.append(await sub.next_msg(timeout=quiet))
        except nats.errors.TimeoutError:
            return got


async def test_websocket_and_alarm_traffic_matches_schemas(worker: Worker, env: Env, tap: NatsClient,
                                                           settings: Settings, config: AppConfig) -> None:
    from websockets.asyncio.client import connect

    from tests.helpers.gateway import ask, gateway

    key = settings.deployment_key
    events = await tap.subscribe("dop.*.Sock.*.ws.>")
    frames = await tap.subscribe(f"dgw.{key}.*")
    beats = await tap.subscribe(f"dgwhb.{key}")
    schedules = await tap.subscribe(f"dal.{key}.s.>")
    await tap.flush()
    async with gateway(settings, config) as gw:
        async with connect(f"{gw}/sock/schemas?tags=a") as ws:
            assert await ask(ws, {"op": "echo", "v": "x"}) == {"echo": "x"}
            await ws.send(b"\x00binary")
            assert await ws.recv() == b"\x00binary"
            assert await ask(ws, {"op": "auto", "req": "ping", "res": "pong"}) == {"auto": True}
            await ws.send(json.dumps({"op": "broadcast", "v": "all"}))
            await ws.recv()
        await env.ALARMERS.get_by_name("schemas").arm(60_000)

        async def beat_and_schedule_tapped() -> bool:
            return beats.pending_msgs > 0 and schedules.pending_msgs > 0

        await assert_eventually(beat_and_schedule_tapped, timeout=settings.gateway_heartbeat_interval + 5,
                                message="a gateway heartbeat and the alarm's schedule on the tap")
    kinds = set()
    for msg in await _drain(events):
        kinds.add(msg.subject.rsplit(".", 1)[1])
        validate("ws_event.json", decode_payload(msg.data, msg.headers))
    assert kinds == {"message", "close"}
    ops = set()
    for msg in await _drain(frames):
        body = decode_payload(msg.data, None)
        validate("gateway_message.json", body)
        ops.update(op[0] for op in body["ops"])
    assert ops == {"send", "auto"}
    heartbeats = await _drain(beats)
    assert heartbeats
    for msg in heartbeats:
        validate("gateway_heartbeat.json", decode_payload(msg.data, None))
    scheduled = await _drain(schedules)
    assert len(scheduled) == 1
    msg = scheduled[0]
    validate("alarm_wakeup.json", decode_payload(msg.data, None))
    assert re.fullmatch(r"@at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", msg.headers["Nats-Schedule"])
    assert msg.headers["Nats-Schedule-Target"] == msg.subject.replace(f"dal.{key}.s.", f"dal.{key}.f.", 1)
