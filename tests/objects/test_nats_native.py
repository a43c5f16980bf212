"""Calling objects the NATS-native way: a plain nats-py connection, the canonical subject
``do.<Class>.<id>.<verb>`` (routed to the partition by the nats-server mapping), JSON payloads,
service-error headers, and the ``$SRV`` micro-services API that ``nats micro`` reads."""

from __future__ import annotations

import json
from typing import Any

from durable.client import Env
from durable.core.wire import ERROR_CODE_HEADER, ERROR_HEADER, partition_of
from durable.objects import Worker
from durable.objects.micro import SERVICE_NAME
from nats.aio.client import Client as NatsClient

from tests.helpers.settings import PARTITIONS
from tests.helpers.wire import (
    JSON_HEADERS,
    as_json,
    assert_error,
    raw_request,
    validate,
)


async def _json_call(nc: NatsClient, subject: str, payload: bytes) -> Any:
    msg = await raw_request(nc, subject, payload, JSON_HEADERS)
    assert msg.headers == JSON_HEADERS, msg.headers
    return json.loads(msg.data)


async def test_counter_over_the_canonical_subject_in_json(worker: Worker, env: Env,
                                                          raw_nc: NatsClient) -> None:
    oid = env.COUNTERS.id_from_name("x").hex
    subject = f"do.Counter.{oid}.rpc.increment"
    assert await _json_call(raw_nc, subject, b'{"args":[5]}') == 5
    assert await _json_call(raw_nc, subject, b'{"kwargs":{"by":2}}') == 7
    assert await _json_call(raw_nc, subject, b"[3]") == 10
    assert await _json_call(raw_nc, subject, b"") == 11
    assert await _json_call(raw_nc, subject, b"{}") == 12
    assert await _json_call(raw_nc, subject, b"null") == 13
    assert await _json_call(raw_nc, f"do.Counter.{oid}.rpc.get", b"") == 13
    # the same object as the stub's (which computes the partition itself)
    assert await env.COUNTERS.get_by_name("x").get() == 13


async def test_server_mapping_picks_the_clients_partition(worker: Worker, env: Env,
                                                          raw_nc: NatsClient) -> None:
    tap = await raw_nc.subscribe("dop.*.Counter.>")
    await raw_nc.flush()
    ids = [env.COUNTERS.new_unique_id().hex for _ in range(40)]
    for oid in ids:
        assert await _json_call(raw_nc, f"do.Counter.{oid}.rpc.get", b"") == 0
    for oid in ids:
        msg = await tap.next_msg(timeout=5)
        assert msg.subject == f"dop.{partition_of(oid, PARTITIONS)}.Counter.{oid}.rpc.get"
    await tap.unsubscribe()


async def test_errors_carry_service_error_headers_and_a_json_body(worker: Worker, env: Env,
                                                                  raw_nc: NatsClient) -> None:
    oid = env.COUNTERS.id_from_name("x").hex
    msg = await raw_request(raw_nc, f"do.Counter.{oid}.rpc.increment", b'{"args":["five"]}', JSON_HEADERS)
    assert msg.headers is not None
    assert msg.headers[ERROR_CODE_HEADER] == "500"
    assert "increment(by) takes an integer, not str" in msg.headers[ERROR_HEADER]
    assert msg.headers["Content-Type"] == "application/json"
    body = json.loads(msg.data)  # a JSON body, not msgpack
    assert body == {"error": {"code": "remote", "type": "TypeError",
                              "message": "increment(by) takes an integer, not str",
                              "retryable": False, "overloaded": False}}
    assert_error(msg, "remote", 500, "integer", json_reply=True)

    msg = await raw_request(raw_nc, f"do.Counter.{oid}.rpc.nope", b"", JSON_HEADERS)
    assert_error(msg, "unknown_method", 404, "Counter has no RPC method 'nope'", json_reply=True)
    msg = await raw_request(raw_nc, f"do.Counter.{oid}.rpc.increment", b"{not json", JSON_HEADERS)
    assert_error(msg, "invalid_request", 400, "malformed JSON payload", json_reply=True)
    # the object was not harmed
    assert await _json_call(raw_nc, f"do.Counter.{oid}.rpc.get", b"") == 0


def _endpoint(stats: dict[str, Any], name: str) -> dict[str, Any]:
    [endpoint] = [e for e in stats["endpoints"] if e["name"] == name]
    return endpoint


async def _micro(nc: NatsClient, subject: str, schema: str) -> dict[str, Any]:
    msg = await raw_request(nc, subject)
    reply = json.loads(msg.data)
    validate(schema, reply)
    return reply


async def test_micro_ping_info_stats_validate(worker: Worker, raw_nc: NatsClient) -> None:
    sid = worker.micro.id
    for subject in ("$SRV.PING", f"$SRV.PING.{SERVICE_NAME}", f"$SRV.PING.{SERVICE_NAME}.{sid}"):
        ping = await _micro(raw_nc, subject, "ping_response.json")
        assert ping["name"] == SERVICE_NAME
    ping = await _micro(raw_nc, f"$SRV.PING.{SERVICE_NAME}.{sid}", "ping_response.json")
    assert ping["id"] == sid and ping["type"] == "io.nats.micro.v1.ping_response"
    assert ping["metadata"]["worker_id"] == worker.worker_id
    assert ping["metadata"]["partitions_owned"] == str(PARTITIONS)

    for subject in ("$SRV.INFO", f"$SRV.INFO.{SERVICE_NAME}", f"$SRV.INFO.{SERVICE_NAME}.{sid}"):
        info = await _micro(raw_nc, subject, "info_response.json")
        assert info["name"] == SERVICE_NAME
    info = await _micro(raw_nc, f"$SRV.INFO.{SERVICE_NAME}.{sid}", "info_response.json")
    assert info["id"] == sid
    assert sorted(e["name"] for e in info["endpoints"]) == sorted(worker.classes)
    for endpoint in info["endpoints"]:
        assert endpoint["subject"] == f"do.{endpoint['name']}.*.>"

    for subject in ("$SRV.STATS", f"$SRV.STATS.{SERVICE_NAME}", f"$SRV.STATS.{SERVICE_NAME}.{sid}"):
        stats = await _micro(raw_nc, subject, "stats_response.json")
        assert stats["name"] == SERVICE_NAME
    stats = await _micro(raw_nc, f"$SRV.STATS.{SERVICE_NAME}.{sid}", "stats_response.json")
    assert stats["id"] == sid
    assert sorted(e["name"] for e in stats["endpoints"]) == sorted(worker.classes)


async def test_micro_stats_count_requests_and_errors(worker: Worker, env: Env,
                                                     raw_nc: NatsClient) -> None:
    subject = f"$SRV.STATS.{SERVICE_NAME}.{worker.micro.id}"
    before = await _micro(raw_nc, subject, "stats_response.json")
    counter_before = _endpoint(before, "Counter")
    probe_before = _endpoint(before, "Probe")

    oid = env.COUNTERS.id_from_name("stats").hex
    for payload in (b"[1]", b'{"kwargs":{"by":2}}', b""):
        await _json_call(raw_nc, f"do.Counter.{oid}.rpc.increment", payload)
    assert await env.COUNTERS.get_by_name("stats").increment() == 5
    msg = await raw_request(raw_nc, f"do.Counter.{oid}.rpc.increment", as_json({"args": ["x"]}), JSON_HEADERS)
    assert_error(msg, "remote", 500)
    msg = await raw_request(raw_nc, f"do.Counter.{oid}.rpc.nope", b"", JSON_HEADERS)
    assert_error(msg, "unknown_method", 404)

    after = await _micro(raw_nc, subject, "stats_response.json")
    counter = _endpoint(after, "Counter")
    assert counter["num_requests"] == counter_before["num_requests"] + 6
    assert counter["num_errors"] == counter_before["num_errors"] + 2
    assert counter["last_error"] == "404:Counter has no RPC method 'nope'"
    assert counter["processing_time"] > counter_before["processing_time"]
    assert counter["average_processing_time"] == counter["processing_time"] // counter["num_requests"]
    assert _endpoint(after, "Probe") == probe_before
    assert after["started"] == before["started"]
