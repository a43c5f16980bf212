"""Reading a `durable` process's log: JSON lines (its stderr is a file, not a terminal)."""

from __future__ import annotations

import json
from typing import Any


def records(text: str) -> list[dict[str, Any]]:
    """The JSON log records in ``text`` (other lines, such as plain prints, are skipped)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def stepped_down_from(text: str) -> dict[int, int]:
    """Partition -> epoch of every step-down logged: one line per partition (fenced) or one
    line for many (lease lapsed), which lists them with their epochs."""
    stepped: dict[int, int] = {}
    for rec in records(text):
        if not str(rec.get("msg", "")).startswith("stepping down from"):
            continue
        if isinstance(rec.get("epochs"), dict):
            stepped.update({int(p): int(e) for p, e in rec["epochs"].items()})
        elif "partition" in rec and "epoch" in rec:
            stepped[int(rec["partition"])] = int(rec["epoch"])
    return stepped
