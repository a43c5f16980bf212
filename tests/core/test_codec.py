"""durable.core.codec: storage values and wire payloads round-trip with their types, and what
cannot be encoded or decoded is refused with an error that says why."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgpack
import pytest
from durable.core import codec
from durable.core.errors import InvalidRequest, StorageError

AWARE = dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
NAIVE = dt.datetime(1999, 12, 31, 12, 0)

VALUES: list[Any] = [
    0, -1, 2**63 - 1, -(2**63), 2**64, 2**64 + 1, -(2**64) - 1, 10**40, -(10**40),
    0.5, float("inf"), True, False, "", "é\U0001F600", b"", b"\x00\xff", AWARE, NAIVE,
    [1, [2, [3]]], {"a": {"b": [b"x", AWARE]}}, {1: "int key"}, [None, None],
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_through_msgpack_with_their_types(value: Any) -> None:
    back = codec.unpack(codec.pack(value))
    assert back == value and type(back) is type(value)
    assert codec.unpack(codec.encode_value(value)) == value


def test_datetimes_keep_their_offset_or_stay_naive() -> None:
    assert codec.unpack(codec.pack(AWARE)).utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert codec.unpack(codec.pack(NAIVE)).tzinfo is None


def test_tuples_come_back_as_lists_and_ints_that_fit_stay_plain_msgpack() -> None:
    assert codec.unpack(codec.pack((1, (2, 3)))) == [1, [2, 3]]
    assert msgpack.unpackb(codec.pack(2**64 - 1)) == 2**64 - 1  # readable by any msgpack decoder
    assert isinstance(msgpack.unpackb(codec.pack(2**64)), msgpack.ExtType)  # beyond 64 bits: ext 1


@pytest.mark.parametrize("value", [{1, 2}, object(), 1j, [frozenset()], {"k": {"nested": {3}}}], ids=repr)
def test_unsupported_types_are_refused_naming_the_type(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot be stored or sent"):
        codec.pack(value)
    with pytest.raises(StorageError, match="value cannot be stored"):
        codec.encode_value(value)


def test_none_and_lone_surrogates_are_refused_as_storage_values() -> None:
    with pytest.raises(StorageError, match="use delete"):
        codec.encode_value(None)
    with pytest.raises(StorageError, match=r"'\\ud800' \(at index 2 of that string\).*lone surrogate"):
        codec.encode_value({"k": "ab\ud800"})


@pytest.mark.parametrize("value", [None, 1, -(10**30) + 1, "é", [1, "a"], {"k": [True, None]}, 0.25], ids=repr)
def test_plain_values_round_trip_through_both_wire_formats(value: Any) -> None:
    for as_json in (False, True):
        assert codec.loads(codec.dumps(value, as_json), as_json) == value


def test_json_tags_bytes_and_datetimes_and_lists_sets_and_tuples() -> None:
    wire = codec.dumps({"b": b"\x00\xff", "t": AWARE, "s": {3}, "u": (1, 2)}, True)
    assert json.loads(wire) == {"b": {"$bytes": "AP8="}, "t": {"$datetime": AWARE.isoformat()}, "s": [3], "u": [1, 2]}
    assert codec.loads(wire, True) == {"b": b"\x00\xff", "t": AWARE, "s": [3], "u": [1, 2]}
    # a map that merely has another key besides the tag is left alone
    assert codec.loads(b'{"$bytes": "AP8=", "x": 1}', True) == {"$bytes": "AP8=", "x": 1}


def test_json_refuses_nan_and_what_it_cannot_tag() -> None:
    with pytest.raises(ValueError):
        codec.dumps(float("nan"), True)
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        codec.dumps(object(), True)


def test_an_empty_payload_is_none_in_both_formats() -> None:
    assert codec.loads(b"", False) is None and codec.loads(b"", True) is None


@pytest.mark.parametrize(("data", "as_json", "kind"), [
    (b"\xc1", False, "msgpack"), (b"\x92\x01", False, "msgpack"), (b"{not json", True, "JSON"),
    (b'{"$bytes": "not base64!"}', True, "JSON"), (b'{"$datetime": "yesterday"}', True, "JSON"),
])
def test_malformed_payloads_are_invalid_requests_naming_the_format(data: bytes, as_json: bool, kind: str) -> None:
    with pytest.raises(InvalidRequest, match=f"malformed {kind} payload"):
        codec.loads(data, as_json)
