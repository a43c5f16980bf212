"""``durable state restore <binding> <object> --at <time> [--fork <new-name>]``.

Both are events of an object on its owner (history_admin.py), so gates and fencing hold: a
restore is an event of the object itself; a fork is an event of the new object, which reads the
source's committed history and leaves the source untouched.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from ..client import Client
from ..core import codec
from ..core.config import AppConfig
from ..core.errors import DurableError, InvalidId, InvalidRequest, StorageError, UnknownMethod, UnknownNamespace
from ..core.settings import Settings
from ..objects.history import parse_time
from .target import Namespace, UsageError

_BAD_INPUT = (InvalidRequest, InvalidId, UnknownMethod, UnknownNamespace, StorageError)


def add_arguments(restore: Any) -> None:
    # argparse takes "-10m" for an option; it passes words that look like negative numbers as
    # values, and this sub-command has no option of that shape, so relative times count as such
    restore._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[a-z]*$")
    restore.add_argument("--at", required=True,
                         help="the time to go back to: ISO (2026-05-01T12:00:00Z), relative (-10m, -2h) or epoch ms")
    restore.add_argument("--fork", metavar="NEW_NAME",
                         help="copy the object's state at that time into this new object instead (the source "
                              "is left as it is)")


async def restore(settings: Settings, config: AppConfig, ns: Namespace, target: str, at: str,
                  fork: str | None) -> int:
    try:
        at_ms = parse_time(at)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    source = ns.object(target)
    if fork is not None:
        dest = ns.object(fork)
        if dest.hex == source.hex:
            raise UsageError("--fork names the object itself: give a new name")
        subject_id, verb = dest.hex, "admin.fork"
        payload: dict[str, Any] = {"source": source.hex, "at_ms": at_ms}
        if dest.name is not None:
            payload["name"] = dest.name
    else:
        subject_id, verb = source.hex, "admin.restore"
        payload = {"at_ms": at_ms}
        if source.name is not None:
            payload["name"] = source.name
    async with await Client.connect(settings, config) as client:
        try:
            done = await client.call(ns.name, subject_id, verb, codec.pack(payload))
        except _BAD_INPUT as exc:
            raise UsageError(exc.message) from None
        except DurableError as exc:
            print(f"durable state restore: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    print(json.dumps(done))
    return 0
