"""``[[subscriptions]]`` in ``durable.toml``: JetStream streams whose messages become events on objects.

```toml
[[subscriptions]]
name = "orders"               # the durable consumer's name (one per subscription)
stream = "ORDERS"             # an existing JetStream stream (the app owns its retention)
subject = "orders.*.created"  # the consumer's filter
object_token = 2              # 1-based token of the subject that names the object (id_from_name)
binding = "ORDERS"            # whose objects receive the messages
handler = "on_message"        # the method called with each message (default on_message)
max_attempts = 5              # tries before the message is parked on the dead-letter subject
```

A stream can be declared beside them, and the worker creates it at start-up when it is missing
(an existing stream is left as it is: its retention and replicas are the app's, changed with the
``nats`` CLI). Handy for development and for apps whose stream is theirs alone:

```toml
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]
max_age = 604800              # seconds a message is kept (0: no limit)
replicas = 1
```

Checked when the file is read (a ConfigError naming ``subscriptions[i]`` and the problem): the
name is one subject token and unique, the binding exists, the object token is a wildcard of the
filter (``*``) or falls inside its trailing ``>``; a literal token would send every message to one
object, a position past the filter's end can never be present. The handler method is checked
against the class when the worker imports it, and the stream when the worker connects to NATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .wire import is_token

DEFAULT_HANDLER = "on_message"


class RawSubscription(BaseModel):
    """One ``[[subscriptions]]`` table as written (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    stream: str
    subject: str
    object_token: int
    binding: str
    handler: str = DEFAULT_HANDLER
    max_attempts: int = Field(default=5, ge=1, le=1000)


class RawStream(BaseModel):
    """One ``[[streams]]`` table: a stream the worker creates if it does not exist."""

    model_config = ConfigDict(extra="forbid")
    name: str
    subjects: list[str] = Field(min_length=1)
    max_age: float = Field(default=0.0, ge=0)
    replicas: int = Field(default=1, ge=1, le=5)


@dataclass(frozen=True)
class StreamDecl:
    """A checked stream declaration."""

    name: str
    subjects: tuple[str, ...]
    max_age: float
    replicas: int


def _stream_name_ok(name: str) -> bool:
    return bool(name) and not any(c in name for c in ". *>\t\r\n/\\")


def check_streams(path: Path, raw: list[RawStream]) -> tuple[StreamDecl, ...]:
    """The declared streams, checked (names unique and valid, subjects valid filters)."""
    out: list[StreamDecl] = []
    seen: set[str] = set()
    for i, s in enumerate(raw):
        where = f"{path}: streams[{i}] ({s.name!r})"
        if not _stream_name_ok(s.name):
            raise ConfigError(f"{where}: name: {s.name!r} is not a JetStream stream name")
        if s.name in seen:
            raise ConfigError(f"{where}: name: another stream is already named {s.name!r}")
        seen.add(s.name)
        for subject in s.subjects:
            if not _valid_subject(subject):
                raise ConfigError(f"{where}: subjects: {subject!r} is not a NATS subject filter "
                                  "(dot-separated tokens; '*' a whole token, '>' only the last)")
        out.append(StreamDecl(s.name, tuple(s.subjects), s.max_age, s.replicas))
    return tuple(out)


@dataclass(frozen=True)
class Subscription:
    """A checked subscription: ``binding`` is the binding's name, ``namespace`` its class name."""

    name: str
    stream: str
    subject: str
    object_token: int
    binding: str
    namespace: str
    handler: str
    max_attempts: int

    def object_name(self, subject: str) -> str | None:
        """The object's name in a message's subject, or None if the subject has no such token."""
        tokens = subject.split(".")
        return tokens[self.object_token - 1] if len(tokens) >= self.object_token else None


def _valid_subject(subject: str) -> bool:
    tokens = subject.split(".")
    if not all(t and not any(c.isspace() for c in t) for t in tokens):
        return False
    return all(t != ">" and (t == "*" or ("*" not in t and ">" not in t)) for t in tokens[:-1]) and \
        (tokens[-1] in ("*", ">") or ("*" not in tokens[-1] and ">" not in tokens[-1]))


def check_subscriptions(path: Path, raw: list[RawSubscription], bindings: dict[str, str]) -> tuple[Subscription, ...]:
    """The subscriptions, checked; ``bindings`` maps binding name -> class name."""
    out: list[Subscription] = []
    seen: set[str] = set()
    for i, s in enumerate(raw):
        where = f"{path}: subscriptions[{i}] ({s.name!r})"
        if not is_token(s.name):
            raise ConfigError(f"{where}: name: must be one subject token (letters, digits, '_' or '-'): it "
                              "names the durable consumer and the dead-letter subject")
        if s.name in seen:
            raise ConfigError(f"{where}: name: another subscription is already named {s.name!r}")
        seen.add(s.name)
        if not _stream_name_ok(s.stream):
            raise ConfigError(f"{where}: stream: {s.stream!r} is not a JetStream stream name")
        if not _valid_subject(s.subject):
            raise ConfigError(f"{where}: subject: {s.subject!r} is not a NATS subject filter "
                              "(dot-separated tokens; '*' a whole token, '>' only the last)")
        if s.binding not in bindings:
            raise ConfigError(f"{where}: binding: no binding {s.binding!r} in [bindings] "
                              f"(have: {', '.join(sorted(bindings)) or 'none'})")
        if not s.handler.isidentifier() or s.handler.startswith("_"):
            raise ConfigError(f"{where}: handler: {s.handler!r} must name a public method of the class")
        tokens = s.subject.split(".")
        tail = tokens[-1] == ">"
        if s.object_token < 1:
            raise ConfigError(f"{where}: object_token: tokens are counted from 1 (got {s.object_token})")
        if s.object_token > len(tokens) and not tail:
            raise ConfigError(f"{where}: object_token: {s.subject!r} has {len(tokens)} tokens, so token "
                              f"{s.object_token} never names an object")
        if s.object_token <= len(tokens) and tokens[s.object_token - 1] not in ("*", ">"):
            raise ConfigError(
                f"{where}: object_token: token {s.object_token} of {s.subject!r} is "
                f"{tokens[s.object_token - 1]!r}, not a wildcard: every message would go to one object "
                "(put '*' where the object's name is)")
        out.append(Subscription(s.name, s.stream, s.subject, s.object_token, s.binding, bindings[s.binding],
                                s.handler, s.max_attempts))
    return tuple(out)
