"""``durable subscriptions ls`` and ``durable parked ls|replay``: the streams into objects, for operators.

``subscriptions ls`` shows each ``[[subscriptions]]`` entry with its consumer's lag (messages
not yet delivered, and delivered but not acknowledged) and how many messages are parked.
``parked ls <subscription>`` lists the parked messages (dead-letter stream, core/dead_letters.py)
with the reason; ``parked replay <subscription> --seq N | --all`` republishes them to their
original subjects, where the stream takes them as new messages (a new sequence, so the object's
order guard lets them run, after the messages already applied), then deletes them from the
dead-letter stream. A replay whose delete fails is listed again (replaying it twice delivers it
twice: the two copies have different sequences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from ..client import Client
from ..core import dead_letters
from ..core.config import AppConfig
from ..core.dead_letters import DeadLetters
from ..core.settings import Settings
from ..core.subscription_config import Subscription
from .target import UsageError

COMMANDS = ("subscriptions", "parked")
#: prints rows (dicts) under the named columns to a stream
Table = Callable[[list[dict[str, Any]], list[str], TextIO], None]


def add_commands(sub: Any) -> None:
    subs = sub.add_parser("subscriptions", help="streams delivered into objects").add_subparsers(
        dest="action", required=True)
    sls = subs.add_parser("ls", help="each subscription: stream, filter, binding, lag, parked messages")
    sls.add_argument("--json", action="store_true")
    parked = sub.add_parser("parked", help="stream messages parked after failing").add_subparsers(
        dest="action", required=True)
    pls = parked.add_parser("ls", help="the parked messages of a subscription, with the reason")
    pls.add_argument("subscription")
    pls.add_argument("--limit", type=int, default=1000)
    pls.add_argument("--json", action="store_true")
    replay = parked.add_parser("replay", help="republish parked messages to their subjects (as new messages)")
    replay.add_argument("subscription")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq", type=int, help="the message's original stream sequence (SEQ in `parked ls`)")
    which.add_argument("--all", action="store_true", help="every parked message of the subscription")


async def run(args: argparse.Namespace, settings: Settings, config: AppConfig, table: Table) -> int:
    """One of these commands; ``table`` prints rows as the other operator commands do."""
    async with await Client.connect(settings, config) as client:
        js = client.nc.jetstream()
        dlq = DeadLetters(settings.deployment_key)
        if args.command == "subscriptions":
            return await _subscriptions_ls(js, dlq, config, args.json, table)
        subscription = _subscription(config, args.subscription)
        if args.action == "ls":
            return await _parked_ls(js, dlq, subscription, max(1, args.limit), args.json, table)
        return await _replay(js, dlq, subscription, args.seq)


def _subscription(config: AppConfig, name: str) -> Subscription:
    for s in config.subscriptions:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in config.subscriptions) or "none"
    raise UsageError(f"no subscription named {name!r} in {config.path}; subscriptions: {known}")


async def _parked_count(js: JetStreamContext, dlq: DeadLetters, name: str) -> int:
    try:
        info = await js.stream_info(dlq.stream, subjects_filter=dlq.subject(name))
    except NotFoundError:
        return 0
    return int((info.state.subjects or {}).get(dlq.subject(name), 0))


async def _subscriptions_ls(js: JetStreamContext, dlq: DeadLetters, config: AppConfig, as_json: bool,
                            table: Table) -> int:
    rows: list[dict[str, Any]] = []
    for s in config.subscriptions:
        row: dict[str, Any] = {"name": s.name, "stream": s.stream, "subject": s.subject, "binding": s.binding,
                               "handler": s.handler, "pending": None, "unacked": None}
        try:
            info = await js.consumer_info(s.stream, s.name)
            row["pending"], row["unacked"] = info.num_pending, info.num_ack_pending
        except NotFoundError:
            row["error"] = "no consumer yet (no worker has started with this subscription)"
        row["parked"] = await _parked_count(js, dlq, s.name)
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table(rows, ["name", "stream", "subject", "binding", "pending", "unacked", "parked"], sys.stdout)
    print(f"({len(rows)} subscriptions; pending: not delivered yet, unacked: delivered, not acknowledged)")
    return 0


async def parked_messages(js: JetStreamContext, dlq: DeadLetters, name: str, limit: int) -> list[dict[str, Any]]:
    """The parked messages of subscription ``name``, oldest first."""
    out: list[dict[str, Any]] = []
    seq = 1
    while len(out) < limit:
        try:
            msg = await js.get_msg(dlq.stream, seq=seq, subject=dlq.subject(name), next=True)
        except NotFoundError:
            break
        h = msg.headers or {}
        parked_at = h.get(dead_letters.PARKED_AT_HEADER)
        out.append({
            "dlq_seq": msg.seq,
            "seq": int(h.get(dead_letters.ORIGINAL_SEQUENCE_HEADER, "0")),
            "subject": h.get(dead_letters.ORIGINAL_SUBJECT_HEADER),
            "attempts": int(h.get(dead_letters.ATTEMPTS_HEADER, "0")),
            "parked_at": datetime.datetime.fromtimestamp(int(parked_at) / 1000, datetime.UTC).isoformat(
                timespec="seconds") if parked_at else None,
            "reason": h.get(dead_letters.REASON_HEADER),
            "headers": dead_letters.original_headers(h),
            "data": msg.data or b"",
        })
        assert msg.seq is not None
        seq = msg.seq + 1
    return out


async def _parked_ls(js: JetStreamContext, dlq: DeadLetters, sub: Subscription, limit: int, as_json: bool,
                     table: Table) -> int:
    rows = await parked_messages(js, dlq, sub.name, limit)
    if as_json:
        print(json.dumps([{**r, "data": r["data"].decode(errors="replace")} for r in rows], indent=2))
        return 0
    table(rows, ["seq", "subject", "attempts", "parked_at", "reason"], sys.stdout)
    print(f"({len(rows)} parked messages of {sub.name}; `durable parked replay {sub.name} --seq SEQ` republishes one)")
    return 0


async def _replay(js: JetStreamContext, dlq: DeadLetters, sub: Subscription, seq: int | None) -> int:
    rows = [r for r in await parked_messages(js, dlq, sub.name, 1_000_000) if seq is None or r["seq"] == seq]
    if seq is not None and not rows:
        raise UsageError(f"no parked message of {sub.name} has stream sequence {seq} (see `durable parked ls "
                         f"{sub.name}`)")
    for r in rows:
        headers = {**r["headers"], dead_letters.REPLAY_OF_HEADER: str(r["seq"])}
        try:
            ack = await js.publish(r["subject"], r["data"], headers=headers)
        except NatsError as exc:  # no stream takes the subject any more, no JetStream, no rights
            print(f"durable parked: cannot republish sequence {r['seq']} to {r['subject']}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        await js.delete_msg(dlq.stream, r["dlq_seq"])
        print(f"replayed {sub.name} sequence {r['seq']} ({r['subject']}) as sequence {ack.seq} of {ack.stream}")
    print(f"({len(rows)} replayed)")
    return 0
