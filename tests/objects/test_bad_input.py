"""Bad input of every kind gets a clear error reply (a code, and a message that names the
problem), and the worker that got it goes on serving."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import msgpack
import pytest
from durable.client import Env
from durable.core import codec
from durable.core.errors import PayloadTooLarge, RemoteError, UnknownMethod
from durable.core.wire import ERROR_CODE_HEADER, ERROR_HEADER, NAME_HEADER
from durable.objects import Worker
from nats.aio.client import Client as NatsClient

from tests.helpers.wire import (
    JSON_HEADERS,
    as_json,
    assert_error,
    assert_ok,
    assert_serving,
    raw_request,
)
from tests.helpers.workers import WorkerFactory

NAME = "bad-input"


async def _expect(nc: NatsClient, env: Env, subject: str, payload: bytes, code: str, status: int,
                  *fragments: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    msg = await raw_request(nc, subject, payload, headers)
    error = assert_error(msg, code, status, *fragments,
                         json_reply=bool(headers and headers.get("Content-Type") == "application/json"))
    await assert_serving(env)
    return error


def _subject(env: Env, binding: str, verb: str, name: str = NAME) -> str:
    ns = getattr(env, binding)
    return f"do.{ns.name}.{ns.id_from_name(name).hex}.{verb}"


async def test_malformed_msgpack(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    subject = _subject(env, "COUNTERS", "rpc.increment")
    for payload in (b"\xc1", b"\x92\x01", b"\x01\x02", b'{"args":[1]}', b"\xdd\xff\xff\xff\xff"):
        await _expect(raw_nc, env, subject, payload, "invalid_request", 400, "malformed msgpack payload")
    await _expect(raw_nc, env, _subject(env, "PROBES", "fetch"), b"\x81\xa3url", "invalid_request", 400,
                  "malformed msgpack payload")


async def test_malformed_json(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    subject = _subject(env, "COUNTERS", "rpc.increment")
    for payload in (b"{not json", b"[1,", b"\xff\xfe\x00", b'{"args":[1]} trailing', b"\x92\x01",
                    b'{"args":[{"$bytes":"%%%"}]}', b'{"args":[{"$datetime":"not a date"}]}'):
        await _expect(raw_nc, env, subject, payload, "invalid_request", 400, "malformed JSON payload",
                      headers=JSON_HEADERS)


async def test_payloads_of_the_wrong_shape(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    subject = _subject(env, "COUNTERS", "rpc.increment")
    cases: list[tuple[Any, str]] = [
        ("text", "rpc payload must be a list of args or a map with args/kwargs, not str"),
        (5, "not int"),
        ({"args": 5}, "'args' must be a list"),
        ({"kwargs": [1]}, "'kwargs' a map"),
        ({"arg": [1]}, "unknown fields ['arg']"),
    ]
    for value, fragment in cases:
        await _expect(raw_nc, env, subject, as_json(value), "invalid_request", 400, fragment, headers=JSON_HEADERS)
        await _expect(raw_nc, env, subject, codec.pack(value), "invalid_request", 400, fragment)
    await _expect(raw_nc, env, subject, codec.pack({"kwargs": {1: 2}}), "invalid_request", 400, "str keys")
    fetch = _subject(env, "PROBES", "fetch")
    for value in ({"url": 5}, [], {"method": "GET"}, {"url": "/", "headers": 5}, {"url": "/", "headers": [["a"]]},
                  {"url": "/", "body": 5}):
        await _expect(raw_nc, env, fetch, codec.pack(value), "invalid_request", 400, "malformed fetch request")
    await _expect(raw_nc, env, _subject(env, "LIFECYCLES", "fetch"), codec.pack({"url": "/"}), "unknown_method",
                  404, "Lifecycle does not define fetch()")


async def test_unknown_verb(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    for verb in ("bogus", "rpc", "rpc.increment.extra", "alarm.x", "ws", "ws.message.extra"):
        await _expect(raw_nc, env, _subject(env, "COUNTERS", verb), b"", "invalid_request", 400,
                      f"unknown verb '{verb}'")
    for payload in (b"", codec.pack({"gen": "1"}), codec.pack([1])):  # the runtime's alarm wake-up
        await _expect(raw_nc, env, _subject(env, "COUNTERS", "alarm"), payload, "invalid_request", 400,
                      "integer 'gen'")


async def test_unknown_namespace(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    oid = env.COUNTERS.id_from_name(NAME).hex
    for cls in ("Nope", "COUNTERS", "counter"):
        error = await _expect(raw_nc, env, f"do.{cls}.{oid}.rpc.increment", b"", "unknown_namespace", 404,
                              f"no Durable Object class '{cls}' is bound here", "Counter")
        assert error["type"] == "UnknownNamespace"


async def test_unknown_namespace_does_not_reach_a_live_object_with_that_id(
        worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    counter = env.COUNTERS.get_by_name(NAME)
    assert await counter.increment() == 1  # now live in the worker
    await _expect(raw_nc, env, f"do.Nope.{counter.id.hex}.rpc.increment", b"", "unknown_namespace", 404, "Nope")
    # another bound class, with the Counter's id: refused as an id of another namespace, not run on the Counter
    await _expect(raw_nc, env, f"do.Probe.{counter.id.hex}.rpc.echo", b"", "invalid_id", 400,
                  "not valid for namespace 'Probe'")
    await _expect(raw_nc, env, f"do.Probe.{counter.id.hex}.rpc.increment", b"", "invalid_id", 400)
    assert await counter.get() == 1


async def test_unknown_private_and_event_handler_methods(worker: Worker, env: Env,
                                                         raw_nc: NatsClient) -> None:
    await _expect(raw_nc, env, _subject(env, "COUNTERS", "rpc.nope"), b"", "unknown_method", 404,
                  "Counter has no RPC method 'nope'")
    for method in ("_private", "__init__", "__class__", "_load"):
        await _expect(raw_nc, env, _subject(env, "PROBES", f"rpc.{method}"), b"", "unknown_method", 404,
                      f"method '{method}' is private")
    for method in ("alarm", "fetch", "websocket_message", "websocket_close", "websocket_error"):
        await _expect(raw_nc, env, _subject(env, "PROBES", f"rpc.{method}"), b"", "unknown_method", 404,
                      f"'{method}'", "event handler")
    # an attribute that is not a method
    await _expect(raw_nc, env, _subject(env, "PROBES", "rpc.EVENT_HANDLERS"), b"", "unknown_method", 404,
                  "Probe has no RPC method 'EVENT_HANDLERS'")


async def test_oversize_payload(start_worker: WorkerFactory, env: Env, raw_nc: NatsClient) -> None:
    worker = await start_worker(max_request_bytes=1000)
    assert raw_nc.max_payload >= 2000
    subject = _subject(env, "PROBES", "rpc.echo")
    await _expect(raw_nc, env, subject, codec.pack(["x" * 2000]), "payload_too_large", 413,
                  "request of 2004 bytes", "limit of 1000 bytes")
    await _expect(raw_nc, env, subject, as_json(["x" * 2000]), "payload_too_large", 413, "limit of 1000 bytes",
                  headers=JSON_HEADERS)
    probe = env.PROBES.get_by_name(NAME)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes"):
        await probe.echo("x" * 2000)
    assert await probe.echo("x" * 10) == {"args": ["x" * 10], "kwargs": {}}  # under the limit still fine
    assert worker.micro.stats["Probe"].num_errors == 3


async def test_invalid_ids(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    good = env.COUNTERS.id_from_name(NAME).hex
    for bad in ("g" * 64, "ab" * 16, good + "00", good[:-1], good.upper(), "x"):
        await _expect(raw_nc, env, f"do.Counter.{bad}.rpc.increment", b"", "invalid_id", 400,
                      "Invalid Durable Object ID: must be 64 hex digits")
    other = env.PROBES.id_from_name(NAME).hex  # a well-formed id of another namespace
    await _expect(raw_nc, env, f"do.Counter.{other}.rpc.increment", b"", "invalid_id", 400,
                  "not valid for namespace 'Counter'")
    forged = good[:-2] + ("00" if good[-2:] != "00" else "01")  # checksum broken
    await _expect(raw_nc, env, f"do.Counter.{forged}.rpc.increment", b"", "invalid_id", 400,
                  "not valid for namespace 'Counter'")


@pytest.mark.parametrize("live", [False, True])
async def test_do_name_that_does_not_match_the_id(worker: Worker, env: Env, raw_nc: NatsClient,
                                                   live: bool) -> None:
    probe = env.PROBES.get_by_name(NAME)
    if live:
        assert await probe.whoami() == {"id": probe.id.hex, "name": NAME}
    subject = f"do.Probe.{probe.id.hex}.rpc.whoami"
    for claimed in ("someone-else", NAME.upper(), "x" * 2000, ""):
        msg = await raw_request(raw_nc, subject, b"", {NAME_HEADER: claimed})
        assert_error(msg, "invalid_request", 400, f"{NAME_HEADER} '{claimed[:20]}", "is not the name of object")
        await assert_serving(env)
    # the right name is accepted, and no name is fine too
    msg = await raw_request(raw_nc, subject, b"", {NAME_HEADER: NAME})
    assert assert_ok(msg) == {"id": probe.id.hex, "name": NAME}
    msg = await raw_request(raw_nc, subject, b"")
    assert assert_ok(msg)["id"] == probe.id.hex


async def test_return_value_that_cannot_be_encoded(worker: Worker, env: Env,
                                                   raw_nc: NatsClient) -> None:
    probe = env.PROBES.get_by_name(NAME)
    with pytest.raises(RemoteError, match="the return value cannot be sent: values of type set") as info:
        await probe.bad_return()
    assert info.value.remote_type == "TypeError"
    await assert_serving(env)
    # JSON has no NaN: a reply must be strict JSON, so a NaN return is an error, not invalid JSON
    msg = await raw_request(raw_nc, _subject(env, "PROBES", "rpc.echo"), b'{"args":[NaN]}', JSON_HEADERS)
    error = assert_error(msg, "remote", 500, "the return value cannot be sent", json_reply=True)
    assert error["type"] == "ValueError"
    json.loads(msg.data, parse_constant=lambda c: pytest.fail(f"reply is not strict JSON: {c}"))
    await assert_serving(env)
    # msgpack carries it fine
    msg = await raw_request(raw_nc, _subject(env, "PROBES", "rpc.echo"), codec.pack([math.inf]))
    assert assert_ok(msg) == {"args": [math.inf], "kwargs": {}}


async def test_wrong_arguments(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    counter = env.COUNTERS.get_by_name(NAME)
    with pytest.raises(RemoteError, match=r"increment\(\) takes from 1 to 2 positional arguments") as info:
        await counter.increment(1, 2)
    assert info.value.remote_type == "TypeError"
    await assert_serving(env)
    with pytest.raises(RemoteError, match="unexpected keyword argument 'nope'"):
        await counter.increment(nope=1)
    await assert_serving(env)
    error = await _expect(raw_nc, env, _subject(env, "PROBES", "rpc.whoami"), as_json({"args": [1]}), "remote", 500,
                          "whoami() takes 1 positional argument but 2 were given", headers=JSON_HEADERS)
    assert error["type"] == "TypeError"
    assert await counter.get() == 0


async def test_stub_refuses_private_methods_locally(env: Env) -> None:
    # no worker runs here: a request would end in Unavailable after the retry deadline, not at once
    stub = env.PROBES.get_by_name("a")
    with pytest.raises(UnknownMethod, match="'_private' is private"):
        await stub._private()
    with pytest.raises(UnknownMethod):
        stub.__nope__  # noqa: B018


async def test_stub_unknown_and_event_handler_methods_raise_unknown_method(worker: Worker, env: Env) -> None:
    stub = env.PROBES.get_by_name("a")
    with pytest.raises(UnknownMethod, match="Probe has no RPC method 'nope'") as info:
        await stub.nope()
    assert info.value.remote_type == "UnknownMethod" and not info.value.retryable
    with pytest.raises(UnknownMethod, match="event handler"):
        await stub.alarm()
    with pytest.raises(UnknownMethod, match="event handler"):
        await stub.websocket_message("x")
    assert await stub.whoami() == {"id": stub.id.hex, "name": "a"}
    await assert_serving(env)


async def test_headers_are_matched_case_insensitively(worker: Worker, env: Env,
                                                      raw_nc: NatsClient) -> None:
    subject = _subject(env, "PROBES", "rpc.whoami")
    for headers in ({"content-type": "application/json"}, {"CONTENT-TYPE": "Application/JSON; charset=utf-8"}):
        msg = await raw_request(raw_nc, subject, b"[]", headers)
        assert assert_ok(msg) == {"id": env.PROBES.id_from_name(NAME).hex, "name": None}
        assert msg.headers == JSON_HEADERS
    msg = await raw_request(raw_nc, subject, b"", {"do-name": "wrong"})
    assert_error(msg, "invalid_request", 400, "is not the name of object")


async def test_blank_error_message_still_fills_the_error_header(worker: Worker, raw_nc: NatsClient) -> None:
    """NATS trims header values, so a whitespace-only message must not leave Nats-Service-Error
    empty. Object code can raise such an error; here the worker answers a real request with it."""
    sub = await raw_nc.subscribe("test.blank-error")
    await raw_nc.flush()
    pending = asyncio.ensure_future(raw_nc.request("test.blank-error", b"", timeout=5))
    msg = await sub.next_msg(timeout=5)
    await worker.dispatcher.reply_error(msg, RemoteError(" \n "), False)
    reply = await pending
    assert reply.headers is not None
    assert reply.headers[ERROR_HEADER] == "remote"
    assert reply.headers[ERROR_CODE_HEADER] == "500"
    assert msgpack.unpackb(reply.data)["error"]["code"] == "remote"
    await sub.unsubscribe()


# ----- names and sizes the client must carry safely ---------------------------------------


@pytest.mark.parametrize("name", [" padded ", "line\nbreak", "tab\t"])
async def test_stub_names_with_edge_whitespace_or_newlines(worker: Worker, env: Env, name: str) -> None:
    stub = env.PROBES.get_by_name(name)
    assert await stub.whoami() == {"id": stub.id.hex, "name": name}


async def test_stub_request_over_the_nats_max_payload(worker: Worker, env: Env, raw_nc: NatsClient) -> None:
    with pytest.raises(PayloadTooLarge, match=str(raw_nc.max_payload)):
        await env.PROBES.get_by_name(NAME).echo("x" * (raw_nc.max_payload + 1))
