"""Helpers for tests that look at durable's messages on the wire: the schemas in ``schemas/``,
the JSON view of a msgpack payload, raw NATS requests and error-reply checks."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
from durable.client import Env
from durable.core.wire import ERROR_CODE_HEADER, ERROR_HEADER
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
MICRO_DIR = SCHEMA_DIR / "nats-micro-v1"
JSON_HEADERS = {"Content-Type": "application/json"}

# RFC 3339 as Go's time.RFC3339 parses it (what the nats CLI does with "started").
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def schema_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("*.json")) + sorted(MICRO_DIR.glob("*.json"))


@cache
def _registry() -> Registry:
    resources = []
    for path in schema_files():
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def _is_rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # raises on a bad date
    return True


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date-time", raises=ValueError)(_is_rfc3339)


def load_schema(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / name if (SCHEMA_DIR / name).exists() else MICRO_DIR / name
    return json.loads(path.read_text())


def validate(name: str, instance: Any) -> None:
    """Validate ``instance`` against ``schemas/<name>`` (or ``schemas/nats-micro-v1/<name>``),
    checking formats (``date-time``) too."""
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, registry=_registry(), format_checker=FORMATS).validate(instance)


def json_view(value: Any) -> Any:
    """A decoded msgpack value in the JSON form the schemas describe: bytes -> {"$bytes": b64}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: json_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_view(v) for v in value]
    return value


def _ext(code: int, data: bytes) -> Any:
    if code == 2:
        return {"$datetime": data.decode()}
    if code == 1:
        return int.from_bytes(data, "big", signed=True)
    raise AssertionError(f"unexpected msgpack ext type {code}")


def decode_payload(data: bytes, headers: dict[str, str] | None) -> Any:
    """The JSON form of a payload as it travelled: JSON as is (tags not decoded), msgpack
    decoded independently of durable.core.codec and mapped to the JSON form."""
    if (headers or {}).get("Content-Type", "").startswith("application/json"):
        return json.loads(data)
    return json_view(msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext))


async def raw_request(nc: NatsClient, subject: str, payload: bytes = b"",
                      headers: dict[str, str] | None = None, timeout: float = 5.0) -> Msg:
    return await nc.request(subject, payload, timeout=timeout, headers=headers)


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def assert_error(msg: Msg, code: str, status: int, *fragments: str, json_reply: bool | None = None) -> dict[str, Any]:
    """An error reply: both service-error headers, a body that validates and carries ``code``, a
    message that contains every fragment. Returns the ``error`` map."""
    headers = msg.headers or {}
    assert ERROR_HEADER in headers, f"not an error reply: headers={headers} data={msg.data[:200]!r}"
    validate("request_headers.json", headers)
    assert headers[ERROR_CODE_HEADER] == str(status), headers
    is_json = headers.get("Content-Type", "").startswith("application/json")
    if json_reply is not None:
        assert is_json == json_reply, headers
    body = decode_payload(msg.data, headers)
    validate("error_reply.json", body)
    error = body["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment.lower() in error["message"].lower(), (fragment, error)
    assert headers[ERROR_HEADER] == (error["message"].replace("\r", " ").replace("\n", " ")[:1000].strip()
                                     or code)
    return error


def assert_ok(msg: Msg) -> Any:
    headers = msg.headers or {}
    assert ERROR_HEADER not in headers, f"error reply: {headers} {msg.data[:300]!r}"
    return decode_payload(msg.data, headers)


async def assert_serving(env: Env, name: str = "still-serving") -> None:
    """The worker still answers: a Counter increment succeeds (and counts)."""
    stub = env.COUNTERS.get_by_name(name)
    before = await stub.get()
    assert await stub.increment() == before + 1
