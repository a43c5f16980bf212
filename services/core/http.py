"""Request and Response: the Fetch API shapes objects and the router exchange."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit


class Headers:
    """Case-insensitive multi-map of header names to values, as in the Fetch API."""

    __slots__ = ("_items",)

    def __init__(self, items: Any = None) -> None:
        self._items: list[tuple[str, str]] = []
        if isinstance(items, Headers):
            self._items = list(items._items)
        elif isinstance(items, dict):
            self._items = [(str(k), str(v)) for k, v in items.items()]
        elif items:
            self._items = [(str(k), str(v)) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for k, v in self._items:
            if k.lower() == lname:
                return v
        return default

    def set(self, name: str, value: str) -> None:
        self.delete(name)
        self._items.append((name, str(value)))

    def append(self, name: str, value: str) -> None:
        self._items.append((name, str(value)))

    def delete(self, name: str) -> None:
        lname = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lname]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def to_wire(self) -> list[list[str]]:
        return [[k, v] for k, v in self._items]


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"body must be str or bytes, not {type(body).__name__}")


class Request:
    """An HTTP request as an object's ``fetch`` sees it."""

    __slots__ = ("method", "url", "headers", "body", "websocket")

    def __init__(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> None:
        self.url = url
        self.method = method.upper()
        self.headers = Headers(headers)
        self.body = _body_bytes(body)
        #: in an object's fetch of a WebSocket upgrade: the socket to pass to ctx.accept_websocket()
        self.websocket: Any = None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.url).query)

    def query_param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object (e.g. an RPC's keyword arguments); ValueError otherwise."""
        value = self.json()
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object")
        return value

    def to_wire(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "headers": self.headers.to_wire(), "body": self.body}

    @classmethod
    def from_wire(cls, data: Any) -> Request:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise ValueError("a fetch request needs a map with a 'url' string")
        return cls(data["url"], str(data.get("method") or "GET"), data.get("headers") or [], data.get("body"))


class Response:
    """An HTTP response an object's ``fetch`` returns."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, body: Any = None, status: int = 200, headers: Any = None) -> None:
        self.status = int(status)
        self.headers = Headers(headers)
        self.body = _body_bytes(body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @classmethod
    def json_response(cls, value: Any, status: int = 200, headers: Any = None) -> Response:
        response = cls(json.dumps(value), status, headers)
        response.headers.set("content-type", "application/json")
        return response

    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def to_wire(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers.to_wire(), "body": self.body}

    @classmethod
    def from_wire(cls, data: Any) -> Response:
        if not isinstance(data, dict) or not isinstance(data.get("status"), int):
            raise ValueError("a fetch reply needs a map with an integer 'status'")
        return cls(data.get("body"), data["status"], data.get("headers") or [])
