"""The recorded reply of a keyed call, without servers: encoded once, replayed in either codec."""

from __future__ import annotations

from durable.core import codec, wire
from durable.core.errors import DurableError, RemoteError, StorageError
from durable.objects.idempotency import Prepared, prepare


def test_a_value_is_recorded_and_replayed_in_the_codec_each_repeat_asks_for() -> None:
    reply = prepare(True, {"value": 3}, as_json=False)
    assert reply.status == 0 and reply.error is None and reply.headers is None
    again = Prepared.unpack(reply.pack())
    assert again == reply
    as_json = again.for_request(True)
    assert as_json.headers == {"Content-Type": codec.JSON_CONTENT_TYPE}
    assert codec.loads(as_json.body, True) == {"value": 3}
    assert wire.decode_reply(None, again.for_request(False).body) == {"value": 3}


def test_an_error_is_recorded_with_its_class_and_status() -> None:
    reply = Prepared.unpack(prepare(False, StorageError("key too long"), as_json=True).pack())
    assert reply.status == 400 and isinstance(reply.error, StorageError)
    msgpack = reply.for_request(False)
    try:
        wire.decode_reply(msgpack.headers, msgpack.body)
    except DurableError as exc:
        assert isinstance(exc, StorageError) and exc.message == "key too long"
    else:
        raise AssertionError("the recorded error was not raised")


def test_a_plain_exception_and_an_unsendable_value_become_remote_errors() -> None:
    plain = prepare(False, ValueError("boom"), as_json=False)
    assert plain.status == 500 and isinstance(plain.error, RemoteError) and plain.error.remote_type == "ValueError"
    unsendable = prepare(True, object(), as_json=True)
    assert unsendable.status == 500 and "cannot be sent" in str(unsendable.error)
