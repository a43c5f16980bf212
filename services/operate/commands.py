"""The operator's commands, registered on the ``durable`` parser by :func:`add_commands`.

Output is for people by default (aligned columns, one event per line) and for programs with
``--json``. Bad input (an unknown binding, a malformed id, JSON that does not parse, a key or
value storage refuses) is one line on stderr and exit code 2; a server that cannot be reached
or an object that fails is exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from pydantic import ValidationError

from ..client import Client, Env
from ..core import codec
from ..core.config import AppConfig, load_config
from ..core.db import connect_writable
from ..core.errors import (
    ConfigError,
    DurableError,
    InvalidId,
    InvalidRequest,
    StorageError,
    Unavailable,
    UnknownMethod,
    UnknownNamespace,
)
from ..core.settings import Settings
from ..objects.storage import check_entries
from . import doctor, inspect, parked, restore, tailer
from .target import Namespace, UsageError, namespace

COMMANDS = ("objects", "state", "call", "alarms", "tail", "doctor", *parked.COMMANDS)
#: a state import sends at most this many bytes of entries per event (requests are at most 1 MiB)
IMPORT_CHUNK_BYTES = 512 * 1024
#: remote errors that mean the operator's input was wrong (exit code 2)
_BAD_INPUT = (InvalidRequest, InvalidId, UnknownMethod, UnknownNamespace, StorageError)


def add_commands(sub: Any) -> None:
    """Register the operator's sub-commands on the ``durable`` parser's sub-parsers."""
    objects = sub.add_parser("objects", help="list the objects of a binding").add_subparsers(dest="action",
                                                                                               required=True)
    ls = objects.add_parser("ls", help="ids, names where known, keys, bytes, last write, alarm")
    ls.add_argument("binding", help="binding (COUNTERS) or class (Counter)")
    ls.add_argument("--prefix", help="only objects whose name starts with this")
    ls.add_argument("--limit", type=int, default=1000)
    ls.add_argument("--json", action="store_true")

    state = sub.add_parser("state", help="read or change one object's storage").add_subparsers(dest="action",
                                                                                                required=True)
    get = state.add_parser("get", help="a key's value, or every key (JSON)")
    put = state.add_parser("put", help="write a key (an event of the object: gates and fencing hold)")
    delete = state.add_parser("delete", help="delete a key, or --all")
    export = state.add_parser("export", help="every key as JSON lines {key, value}")
    imp = state.add_parser("import", help="write JSON lines {key, value} (from export) into the object")
    rst = state.add_parser("restore", help="put the object's storage back as it was at a time (or --fork it)")
    restore.add_arguments(rst)
    for p in (get, put, delete, export, imp, rst):
        p.add_argument("binding", help="binding (COUNTERS) or class (Counter)")
        p.add_argument("object", help="the object's name, or its 64-hex id")
    get.add_argument("key", nargs="?")
    put.add_argument("key")
    put.add_argument("value", help="JSON (bytes as {\"$bytes\": base64}, datetimes as {\"$datetime\": iso})")
    delete.add_argument("key", nargs="?")
    delete.add_argument("--all", action="store_true", help="delete every key and the alarm")
    export.add_argument("--output", "-o", help="a file (default: standard output)")
    imp.add_argument("file", nargs="?", default="-", help="JSON lines (default: standard input)")
    imp.add_argument("--replace", action="store_true", help="delete every key first")

    alarms = sub.add_parser("alarms", help="pending alarms").add_subparsers(dest="action", required=True)
    als = alarms.add_parser("ls", help="alarms by due time")
    als.add_argument("binding", nargs="?", help="only this binding or class")
    als.add_argument("--overdue", action="store_true", help="only alarms more than a second late")
    als.add_argument("--limit", type=int, default=1000)
    als.add_argument("--json", action="store_true")

    call = sub.add_parser("call", help="call an RPC method: durable call COUNTERS demo increment '[5]'")
    call.add_argument("binding")
    call.add_argument("object", help="the object's name, or its 64-hex id")
    call.add_argument("method")
    call.add_argument("args", nargs="?", help="JSON: a list of arguments, an object of keyword arguments, "
                                              "or one value")

    tail = sub.add_parser("tail", help="live requests, alarm runs and log lines, until Ctrl-C")
    tail.add_argument("binding", nargs="?")
    tail.add_argument("object", nargs="?", help="the object's name, or its 64-hex id")
    tail.add_argument("--json", action="store_true", help="one JSON event per line")

    doc = sub.add_parser("doctor", help="check NATS, Postgres, workers and clocks; say what to fix")
    doc.add_argument("--monitor", help="nats-server monitoring URL (default http://<nats host>:8222)")
    parked.add_commands(sub)


def run(args: argparse.Namespace, run_coroutine: Callable[[Coroutine[Any, Any, int]], int]) -> int:
    """Run one operator command; its exit code."""
    try:
        settings, config = _settings()
        if args.command in parked.COMMANDS:
            return run_coroutine(parked.run(args, settings, config, _table))
        return run_coroutine(_dispatch(args, settings, config))
    except UsageError as exc:
        print(f"durable {args.command}: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"durable {args.command}: {exc.message}", file=sys.stderr)
        return 1


def _settings() -> tuple[Settings, AppConfig]:
    """The deployment's settings; with nothing configured, the servers `durable dev` runs."""
    try:
        settings = Settings()
        config = load_config(settings.config_file)
    except ValidationError as exc:
        raise UsageError(f"bad DURABLE_* settings: {exc.errors()[0].get('msg')}") from None
    except ConfigError as exc:
        raise UsageError(exc.message.replace("\n", " ")) from None
    return settings.or_dev_servers(), config


async def _dispatch(args: argparse.Namespace, settings: Settings, config: AppConfig) -> int:
    command = args.command
    if command == "doctor":
        return await _doctor(settings, config, args.monitor)
    if command == "tail":
        return await _tail(settings, config, args)
    ns = namespace(settings, config, args.binding) if getattr(args, "binding", None) else None
    if command == "alarms":
        return await _with_db(settings, lambda conn: _alarms_ls(conn, ns, args))
    assert ns is not None
    if command == "objects":
        return await _with_db(settings, lambda conn: _objects_ls(conn, ns, args))
    if command == "call":
        return await _call(settings, config, ns, args)
    if args.action == "restore":
        return await restore.restore(settings, config, ns, args.object, args.at, args.fork)
    return await _state(args, settings, config, ns)


async def _state(args: argparse.Namespace, settings: Settings, config: AppConfig, ns: Namespace) -> int:
    oid = ns.object(args.object)
    if args.action == "get":
        return await _with_db(settings, lambda conn: _state_get(conn, oid.hex, args.key))
    if args.action == "export":
        return await _with_db(settings, lambda conn: _state_export(conn, oid.hex, args.output))
    if args.action == "put":
        value = _json_arg(args.value, "value")
        return await _admin(settings, config, ns, args.object, [{"put": {args.key: value}}])
    if args.action == "delete":
        if args.all == (args.key is not None):
            raise UsageError("name one key, or --all")
        write = {"delete_all": True} if args.all else {"delete": [args.key]}
        return await _admin(settings, config, ns, args.object, [write])
    entries, alarm = _read_jsonl(args.file)
    try:  # every entry checked here first: a refusal half-way would leave the object half-imported
        check_entries(entries)
    except StorageError as exc:
        raise UsageError(exc.message) from None
    writes: list[dict[str, Any]] = [{"put": chunk} for chunk in _chunks(entries)] or [{}]
    if args.replace:  # the wipe commits with the first chunk, never alone
        writes[0]["delete_all"] = True
    if alarm is not None:  # with the first chunk too: a class without alarm() refuses before any write
        writes[0]["set_alarm"] = alarm
    return await _admin(settings, config, ns, args.object, writes)


# ----- reads (Postgres) --------------------------------------------------------------------------

async def _with_db(settings: Settings, fn: Callable[[asyncpg.Connection], Coroutine[Any, Any, int]]) -> int:
    try:
        conn = await connect_writable(settings.database_url, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"durable: cannot reach Postgres at {settings.database_url}: {exc}", file=sys.stderr)
        return 1
    try:
        return await fn(conn)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        print("durable: this database's schema is missing or older than this version of durable "
              "(start a worker of this version once: it applies the schema)", file=sys.stderr)
        return 1
    finally:
        await conn.close()


def _table(rows: list[dict[str, Any]], columns: list[str], out: TextIO) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


async def _objects_ls(conn: asyncpg.Connection, ns: Namespace, args: argparse.Namespace) -> int:
    rows = await inspect.list_objects(conn, ns.name, args.prefix, max(1, args.limit))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ["id", "name", "keys", "bytes", "last_write", "alarm"], sys.stdout)
        print(f"({len(rows)} objects of {ns.name})")
    return 0


async def _state_get(conn: asyncpg.Connection, object_id: str, key: str | None) -> int:
    state = await inspect.read_state(conn, object_id, key)
    if key is not None:
        if key not in state:
            print(f"durable state: no key {key!r} in this object", file=sys.stderr)
            return 1
        print(codec.to_json_text(state[key]))
    else:
        print(codec.to_json_text(state))
    return 0


async def _state_export(conn: asyncpg.Connection, object_id: str, output: str | None) -> int:
    state = await inspect.read_state(conn, object_id)
    lines = [codec.to_json_text({"key": k, "value": v}) for k, v in state.items()]
    alarm = await inspect.read_alarm(conn, object_id)
    if alarm is not None:  # the object's alarm travels with its keys
        lines.append(codec.to_json_text({"alarm": alarm}))
    text = "".join(line + "\n" for line in lines)
    if output:
        await asyncio.to_thread(Path(output).write_text, text)
        print(f"exported {len(lines)} keys to {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def _alarms_ls(conn: asyncpg.Connection, ns: Namespace | None, args: argparse.Namespace) -> int:
    rows = await inspect.list_alarms(conn, ns.name if ns else None, args.overdue, max(1, args.limit))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ["namespace", "id", "name", "due", "late_s", "retries"], sys.stdout)
        print(f"({len(rows)} alarms{' overdue' if args.overdue else ''})")
    return 0


# ----- input ---------------------------------------------------------------------------------------

def _json_arg(text: str, what: str) -> Any:
    try:
        return codec.from_json_text(text)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"the {what} is not JSON ({exc}): {text[:80]!r}") from None


def _read_jsonl(file: str) -> tuple[dict[str, Any], int | None]:
    """The entries of an export (``{"key", "value"}`` lines) and its alarm (an ``{"alarm": ms}`` line)."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None
    entries: dict[str, Any] = {}
    alarm: int | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        entry = _json_arg(line, f"line {n}")
        if isinstance(entry, dict) and set(entry) == {"alarm"} and isinstance(entry["alarm"], int):
            alarm = entry["alarm"]
            continue
        if not isinstance(entry, dict) or set(entry) != {"key", "value"} or not isinstance(entry["key"], str):
            raise UsageError(f"line {n} is not {{\"key\": <str>, \"value\": <JSON>}} or {{\"alarm\": <ms>}} "
                             "(what export writes)")
        entries[entry["key"]] = entry["value"]
    return entries, alarm


def _chunks(entries: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries in groups of about IMPORT_CHUNK_BYTES (each group is one event)."""
    chunks: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = 0
    for key, value in entries.items():
        n = len(key) + len(codec.pack(value)) + 16
        if current and size + n > IMPORT_CHUNK_BYTES:
            chunks.append(current)
            current, size = {}, 0
        current[key] = value
        size += n
    if current:
        chunks.append(current)
    return chunks


# ----- writes and calls (through the owning object) -------------------------------------------------

async def _admin(settings: Settings, config: AppConfig, ns: Namespace, target: str,
                 writes: list[dict[str, Any]]) -> int:
    oid = ns.object(target)
    async with await Client.connect(settings, config) as client:
        totals = {"put": 0, "deleted": 0, "wiped": 0}
        for write in writes:
            if oid.name is not None:
                write = {**write, "name": oid.name}
            try:
                done = await client.call(ns.name, oid.hex, "admin.state", codec.pack(write))
            except _BAD_INPUT as exc:
                raise UsageError(exc.message) from None
            except DurableError as exc:
                print(f"durable state: {exc.code}: {exc.message}", file=sys.stderr)
                return 1
            for k in totals:
                totals[k] += int(done.get(k, 0))
    print(json.dumps(totals))
    return 0


async def _call(settings: Settings, config: AppConfig, ns: Namespace, args: argparse.Namespace) -> int:
    oid = ns.object(args.object)
    parsed = None if args.args is None else _json_arg(args.args, "argument list")
    positional = parsed if isinstance(parsed, list) else ([] if parsed is None or isinstance(parsed, dict)
                                                          else [parsed])
    keywords = parsed if isinstance(parsed, dict) else {}
    if args.method.startswith("_"):
        raise UsageError(f"method {args.method!r} is private")
    async with await Client.connect(settings, config) as client:
        stub = getattr(Env(client, config), ns.binding.name).get(oid)
        try:
            result = await getattr(stub, args.method)(*positional, **keywords)
        except _BAD_INPUT as exc:
            raise UsageError(exc.message) from None
        except DurableError as exc:
            print(f"durable call: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    print(codec.to_json_text(result))
    return 0


# ----- tail and doctor -----------------------------------------------------------------------------

async def _tail(settings: Settings, config: AppConfig, args: argparse.Namespace) -> int:
    ns = namespace(settings, config, args.binding) if args.binding else None
    object_id = ns.object(args.object).hex if ns is not None and args.object else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def out(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else tailer.render(event), flush=True)

    async with await Client.connect(settings, config) as client:
        what = f"{ns.name if ns else 'every class'}{' ' + args.object if object_id else ''}"
        print(f"tailing {what} (Ctrl-C stops)", file=sys.stderr, flush=True)
        await tailer.tail(client.nc, settings.deployment_key, ns.name if ns else None, object_id, out, stop)
    return 0


async def _doctor(settings: Settings, config: AppConfig, monitor: str | None) -> int:
    checks = await doctor.run(settings, config, monitor)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.ok is False]
    print(f"\n{len(failed)} problem(s)" if failed else "\nno problems found")
    return 1 if failed else 0
