"""The wire protocol's encoders and decoders, without servers: what one side writes the other reads."""

from __future__ import annotations

import pytest
from durable.core import codec, wire
from durable.core.errors import InvalidRequest, ProtocolError, RemoteError, StorageError


def test_fnv1a_matches_known_vectors_and_nats_partitioning() -> None:
    assert wire.fnv1a_32(b"") == 0x811C9DC5
    assert wire.fnv1a_32(b"a") == 0xE40C292C
    assert wire.fnv1a_32(b"foobar") == 0xBF9CF968
    assert wire.partition_of("foobar", 16) == 0xBF9CF968 % 16


def test_a_request_subject_round_trips() -> None:
    subject = wire.request_subject(7, "Counter", "ab" * 32, "rpc.increment")
    assert subject == f"dop.7.Counter.{'ab' * 32}.rpc.increment"
    address = wire.parse_request_subject(subject)
    assert (address.namespace, address.object_id, address.verb) == ("Counter", "ab" * 32, ["rpc", "increment"])
    assert address.valid
    short = wire.parse_request_subject("dop.7.Counter")
    assert not short.valid and short.namespace == "Counter"
    assert wire.parse_request_subject("dop").namespace == "?"


def test_headers_are_found_whatever_their_case() -> None:
    assert wire.header({"do-name": "x"}, "Do-Name") == "x"
    assert wire.header({"Do-Name": "y"}, "Do-Name") == "y"
    assert wire.header({}, "Do-Name") is None


@pytest.mark.parametrize("as_json", [False, True])
def test_an_error_reply_decodes_to_the_same_error(as_json: bool) -> None:
    headers, body = wire.encode_error_reply(StorageError("value too large\r\nsecond line"), as_json)
    assert "\n" not in headers[wire.ERROR_HEADER] and headers[wire.ERROR_CODE_HEADER] == "400"
    with pytest.raises(StorageError, match="value too large"):
        wire.decode_reply(headers, body if not as_json else codec.dumps(codec.loads(body, True), False))


def test_a_blank_error_message_still_fills_the_header() -> None:
    headers, _ = wire.encode_error_reply(RemoteError(" \n "), False)
    assert headers[wire.ERROR_HEADER] == RemoteError(" ").code


def test_replies_decode_values_and_refuse_garbage() -> None:
    assert wire.decode_reply(None, codec.dumps({"n": 1}, False)) == {"n": 1}
    assert wire.decode_reply({}, b"") is None
    with pytest.raises(ProtocolError, match="malformed reply"):
        wire.decode_reply(None, b"\xc1")
    with pytest.raises(ProtocolError, match="503 gone"):
        wire.decode_reply({wire.ERROR_HEADER: "gone", wire.ERROR_CODE_HEADER: "503"}, b"\xc1")


def test_gateway_operations_round_trip() -> None:
    ops: list[wire.GatewayOp] = [
        wire.SendOp(["s1", "s2"], "hello"),
        wire.SendOp(["s3"], b"\x00bin"),
        wire.CloseOp("s1", 4000, "bye"),
        wire.AutoOp(["s2"], ("ping", "pong")),
        wire.AutoOp(["s3"], None),
    ]
    decoded = [wire.op_from_wire(raw) for raw in wire.decode_ops(wire.encode_ops(ops))]
    assert decoded == ops


@pytest.mark.parametrize("raw", [[], "send", ["send", ["s"], 5], ["send", "s", "x"], ["nope", 1], ["close", "s"]])
def test_a_malformed_operation_is_refused(raw: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        wire.op_from_wire(raw)


def test_split_ops_keeps_order_and_the_budget() -> None:
    ops: list[wire.GatewayOp] = [wire.SendOp([f"s{i}"], "x" * 300) for i in range(10)]
    chunks = wire.split_ops(ops, budget=1000)
    assert [op for chunk in chunks for op in chunk] == ops
    assert all(len(chunk) == 2 for chunk in chunks)  # 2 x (64 + 300 + 40) fits, a third does not


def test_split_ops_gives_an_oversized_operation_a_message_of_its_own() -> None:
    big = wire.SendOp(["s"], "x" * 5000)
    chunks = wire.split_ops([wire.CloseOp("a", 1000, ""), big, wire.CloseOp("b", 1000, "")], budget=1000)
    assert chunks == [[wire.CloseOp("a", 1000, "")], [big], [wire.CloseOp("b", 1000, "")]]


def test_socket_events_are_checked_field_by_field() -> None:
    event = codec.loads(wire.ws_close("s1", 1006, "", False), False)
    assert wire.parse_ws_event("close", event) == {"sid": "s1", "code": 1006, "reason": "", "clean": False}
    assert wire.parse_ws_event("message", codec.loads(wire.ws_message("s1", b"b"), False))["data"] == b"b"
    assert wire.parse_ws_event("error", codec.loads(wire.ws_error("s1", "boom"), False))["error"] == "boom"
    with pytest.raises(InvalidRequest, match="unknown WebSocket event"):
        wire.parse_ws_event("open", {})
    with pytest.raises(InvalidRequest, match="'code'"):
        wire.parse_ws_event("close", {"sid": "s", "code": "1000", "reason": "", "clean": True})
    with pytest.raises(InvalidRequest, match="needs a map"):
        wire.parse_ws_event("message", ["s", "x"])


def test_auto_response_header_and_socket_queries_round_trip() -> None:
    assert wire.parse_auto_response_header(wire.auto_response_header(("ping", "pöng"))) == ("ping", "pöng")
    assert wire.parse_socket_query(wire.socket_query("s9")) == "s9"
    assert wire.parse_socket_query_answer(wire.socket_query_answer(123)) == 123
    assert wire.parse_socket_query_answer(wire.socket_query_answer(None)) is None
    assert wire.parse_gateway_heartbeat(wire.gateway_heartbeat("gw-1", 3)) == "gw-1"
    assert wire.parse_gateway_heartbeat(b"junk") is None


def test_alarm_subjects_and_fires() -> None:
    subjects = wire.AlarmSubjects(42)
    assert subjects.schedule(3, "ab") == "dal.42.s.3.ab" and subjects.fire(3, "ab") == "dal.42.f.3.ab"
    assert subjects.stream == "DURABLE_ALARMS_42" and subjects.fires == "dal.42.f.>"
    fire = wire.parse_alarm_fire(subjects.fire(3, "ab"), wire.alarm_schedule_body("Counter", 77))
    assert fire == wire.AlarmFire(3, "ab", "Counter", 77)
    for subject, body in [("dal.42.f.x.ab", wire.alarm_schedule_body("C", 1)), (subjects.fire(3, "ab"), b"\xc1"),
                          (subjects.fire(3, "ab"), codec.dumps({"ns": "C", "gen": "1"}, False))]:
        with pytest.raises(ValueError, match="malformed alarm wake-up"):
            wire.parse_alarm_fire(subject, body)
    assert wire.parse_alarm_wakeup(codec.loads(wire.alarm_wakeup(5), False)) == 5
    with pytest.raises(InvalidRequest):
        wire.parse_alarm_wakeup({"gen": "5"})


def test_the_server_mapping_names_the_partition_count() -> None:
    assert wire.server_mapping(16) == '"do.*.*.>": "dop.{{partition(16,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.>"'
