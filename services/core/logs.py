"""Log lines: JSON objects (one per line) when stderr is not a terminal, plain text when it is.

The standard library's logging with a formatter of our own, so every library's records (nats-py,
asyncpg, uvicorn) come out in the same shape without another dependency. A record's context
travels in ``extra=`` (worker, namespace, object_id, partition, epoch, partitions ...): those
fields become top-level keys of the JSON line, and ``key=value`` pairs after the message in
text. Noisy per-partition events are logged once per batch, the partitions listed with
:func:`ranges`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", <context>..., "exc"}``: one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _context(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _context(record)
        if not context:
            return text
        pairs = " ".join(f"{k}={v}" for k, v in context.items())
        head, sep, tail = text.partition("\n")  # a traceback stays below the line
        return f"{head} {pairs}{sep}{tail}"


def use_json(fmt: str, stream: TextIO | None = None) -> bool:
    """``json``/``text`` as asked; ``auto``: JSON unless ``stream`` (stderr) is a terminal."""
    if fmt in ("json", "text"):
        return fmt == "json"
    stream = stream or sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def configure(level: int, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send the root logger's records to stderr in the chosen format (replacing its handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json(fmt, stream) else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def ranges(parts: Iterable[int]) -> str:
    """``0-3,7,9-10``: a list of partitions for one log line."""
    out: list[str] = []
    ordered = sorted(parts)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
