"""Encoding of storage values and of wire messages.

Values are msgpack with two extension types, so they round-trip with their Python types:
ints beyond 64 bits (ext 1) and datetimes, naive or aware (ext 2). Tuples come back as lists,
as in any msgpack or JSON round trip. The wire is msgpack by default; a request with
``Content-Type: application/json`` gets JSON, where bytes and datetimes are tagged objects.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import msgpack

from .errors import InvalidRequest, StorageError

_EXT_BIGINT = 1
_EXT_DATETIME = 2

JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"


def _default(obj: Any) -> Any:
    if isinstance(obj, int) and not isinstance(obj, bool):
        length = (obj.bit_length() + 8) // 8
        return msgpack.ExtType(_EXT_BIGINT, obj.to_bytes(length, "big", signed=True))
    if isinstance(obj, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    raise TypeError(f"values of type {type(obj).__name__} cannot be stored or sent")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    if code == _EXT_DATETIME:
        return dt.datetime.fromisoformat(data.decode())
    return msgpack.ExtType(code, data)


def pack(value: Any) -> bytes:
    """msgpack with durable's extension types; raises TypeError for unsupported types."""
    packed: bytes = msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode_value(value: Any) -> bytes:
    """Encode a storage value, turning unsupported types into a StorageError that names them."""
    if value is None:
        raise StorageError("put() called with None: None is what get() answers for a missing key; "
                           "use delete() to remove a key")
    try:
        return pack(value)
    except UnicodeEncodeError as exc:
        raise StorageError(f"value cannot be stored: {not_unicode(exc)}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise StorageError(f"value cannot be stored: {exc}") from None


def not_unicode(exc: UnicodeEncodeError) -> str:
    """Why a str cannot be sent or stored as UTF-8 (a lone surrogate, such as JSON's "\\ud800"
    decodes to), naming the character and where it is."""
    bad = exc.object[exc.start:exc.end]
    return (f"a string holds {bad!r} (at index {exc.start} of that string), which is not valid Unicode "
            "(a lone surrogate); strings are stored and sent as UTF-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, dt.datetime):
        return {"$datetime": obj.isoformat()}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"values of type {type(obj).__name__} cannot be sent as JSON")


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$bytes" in obj and isinstance(obj["$bytes"], str):
            return base64.b64decode(obj["$bytes"], validate=True)
        if "$datetime" in obj and isinstance(obj["$datetime"], str):
            return dt.datetime.fromisoformat(obj["$datetime"])
    return obj


def dumps(value: Any, as_json: bool) -> bytes:
    if as_json:
        # allow_nan=False: NaN and Infinity are not JSON; strict parsers refuse the whole reply
        return json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False).encode()
    return pack(value)


def loads(data: bytes, as_json: bool) -> Any:
    """Decode a wire payload; anything malformed becomes an InvalidRequest naming the format."""
    try:
        if as_json:
            return json.loads(data, object_hook=_json_hook) if data else None
        return unpack(data) if data else None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the same user error
        kind = "JSON" if as_json else "msgpack"
        raise InvalidRequest(f"malformed {kind} payload: {exc}") from None


def to_json_text(value: Any) -> str:
    """A stored value as JSON text for people and files (``durable state``): bytes and datetimes
    as the same tagged objects the wire uses, so ``from_json_text`` gives the value back."""
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def from_json_text(text: str) -> Any:
    """The value of ``to_json_text``'s output (or any JSON a person typed)."""
    return json.loads(text, object_hook=_json_hook)
