"""The y-websocket frame reader (yprotocol.py) on its own: what Yjs clients send reads back, and
everything else is refused with a reason before anything acts on it."""

from __future__ import annotations

import pytest
from durable.objects.patterns.yprotocol import (
    CLOSE_BAD_FRAME,
    AwarenessEntry,
    MessageType,
    ProtocolError,
    SyncStep,
    awareness_message,
    encode_awareness,
    parse_awareness,
    parse_frame,
    sync_message,
    var_uint,
)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**53 - 1])
def test_var_uints_read_back_as_lib0_writes_them(n: int) -> None:
    frame = parse_frame(sync_message(SyncStep.UPDATE, b"x" * (n % 1000)))
    assert frame.payload == b"x" * (n % 1000)
    assert parse_awareness(encode_awareness([AwarenessEntry(n, n, "{}")])) == [AwarenessEntry(n, n, "{}")]
    assert var_uint(300) == b"\xac\x02"  # lib0's encoding of 300


def test_each_message_type_reads_as_itself() -> None:
    step1 = parse_frame(sync_message(SyncStep.STEP1, b"\x00"))
    assert (step1.kind, step1.step, step1.payload) == (MessageType.SYNC, SyncStep.STEP1, b"\x00")
    aware = parse_frame(awareness_message(encode_awareness([AwarenessEntry(5, 2, '{"user":{"name":"Ada"}}')])))
    assert aware.kind is MessageType.AWARENESS
    assert parse_awareness(aware.payload) == [AwarenessEntry(5, 2, '{"user":{"name":"Ada"}}')]
    assert parse_frame(b"\x03").kind is MessageType.QUERY_AWARENESS
    assert AwarenessEntry(5, 3, "null").removed


@pytest.mark.parametrize(("frame", "reason"), [
    (b"", "truncated"),
    (b"\x80\x80", "truncated"),
    (b"\x09", "unknown message type"),
    (b"\x00\x03\x00", "unknown sync step"),
    (b"\x00\x00\x04ab", "truncated"),
    (sync_message(SyncStep.STEP1, b"\x00") + b"\x00", "after the end"),
    (b"\x00" + b"\x80" * 9 + b"\x01", "longer than 8 bytes"),
    (b"\x00" + b"\xff" * 7 + b"\x7f", "over 2**53"),
    (awareness_message(b"\x01\x01\x01\x03abc"), "not JSON"),
    (awareness_message(b"\x01\x01\x01\x03NaN"), "not JSON"),  # Python reads NaN; JSON.parse does not
    (awareness_message(b"\x01\x01\x01\x02\xff\xfe"), "not UTF-8"),
    (awareness_message(b"\x02\x01\x01\x02{}"), "truncated"),
    (awareness_message(b"\x01\x01\x01\x02{}!"), "after the end"),
])
def test_malformed_frames_are_refused_with_a_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parsed = parse_frame(frame)
        if parsed.kind is MessageType.AWARENESS:
            parse_awareness(parsed.payload)
    assert reason in err.value.reason and err.value.code == CLOSE_BAD_FRAME


def test_a_var_uint_past_javascripts_safe_integers_cannot_be_written() -> None:
    with pytest.raises(ValueError):
        var_uint(2**53)
