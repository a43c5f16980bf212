"""Reading and writing the part of nats-server's configuration format that deploy/nats/*.conf
uses, so the tests can check those files' settings and run them on loopback ports.

The format: ``key: value``, ``key = value`` or ``key { ... }``; blocks ``{}``, arrays ``[]``
(items separated by commas or new lines), quoted strings, bare tokens (``1MB``,
``0.0.0.0:4222``, ``nats-route://host:6222``), ``#`` and ``//`` comments. A bare token is kept
as :class:`Bare` (a ``str``), so writing the file back leaves it unquoted as nats-server needs
for sizes such as ``1MB``; bare integers and booleans become ``int`` and ``bool``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_KEY = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.$*>-]+')
_BARE_END = re.compile(r"[\s,;}\]#]")


class Bare(str):
    """A value written without quotes in the file (a size, an address, a route URL)."""


class ConfError(ValueError):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> ConfError:
        line = self.text.count("\n", 0, self.pos) + 1
        return ConfError(f"line {line}: {what}")

    def skip(self, newlines: bool = True) -> None:
        """Past blanks, comments and (if ``newlines``) line ends and commas/semicolons."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\r" or (newlines and c in "\n,;"):
                self.pos += 1
            elif c == "#" or self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def block(self, closing: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            self.skip()
            if self.peek() == closing:
                self.pos += 1
                return out
            if not self.peek():
                if closing:
                    raise self.error(f"missing {closing!r}")
                return out
            m = _KEY.match(self.text, self.pos)
            if m is None:
                raise self.error(f"expected a key, found {self.text[self.pos:self.pos + 20]!r}")
            key = json.loads(m.group()) if m.group().startswith('"') else m.group()
            self.pos = m.end()
            self.skip(newlines=False)
            if self.peek() in (":", "="):
                self.pos += 1
                self.skip(newlines=False)
            if key in out:
                raise self.error(f"{key!r} given twice")
            out[key] = self.value()

    def value(self) -> Any:
        c = self.peek()
        if c == "{":
            self.pos += 1
            return self.block("}")
        if c == "[":
            self.pos += 1
            items: list[Any] = []
            while True:
                self.skip()
                if self.peek() == "]":
                    self.pos += 1
                    return items
                if not self.peek():
                    raise self.error("missing ']'")
                items.append(self.value())
        if c == '"':
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(self.text, self.pos)
            if m is None:
                raise self.error("unterminated string")
            self.pos = m.end()
            return json.loads(m.group())
        m = _BARE_END.search(self.text, self.pos)
        end = len(self.text) if m is None else m.start()
        token = self.text[self.pos:end].strip()
        if not token:
            raise self.error("missing value")
        self.pos = end
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        return Bare(token)


def parse(text: str) -> dict[str, Any]:
    """The configuration as nested dicts and lists (see the module docstring)."""
    return _Reader(text).block("")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)


def _value(value: Any, indent: str) -> str:
    if isinstance(value, dict):
        inner = indent + "  "
        lines = [f"{inner}{_key(k)}: {_value(v, inner)}" for k, v in value.items()]
        return "{\n" + "\n".join(lines) + f"\n{indent}}}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v, indent) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Bare)):
        return str(value)
    return json.dumps(str(value))


def dump(conf: dict[str, Any]) -> str:
    """A configuration file nats-server reads back as ``conf``."""
    return "".join(f"{_key(k)}: {_value(v, '')}\n" for k, v in conf.items())
