"""Apps with a ``[[subscriptions]]`` entry, each on a stream of its own (tests of streams into objects)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durable.core.dead_letters import DeadLetters
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class StreamApp:
    """A durable.toml binding TALLIES (tests.helpers.subscribers:Tally) with one subscription."""

    path: Path
    stream: str
    #: the stream's subjects are ``<prefix>.>``; messages go to ``<prefix>.<object>.created``
    prefix: str
    subscription: str

    def subject(self, name: str) -> str:
        return f"{self.prefix}.{name}.created"


def write_app(folder: Path, **subscription: Any) -> StreamApp:
    """An app whose subscription reads ``<prefix>.*.created`` (token 2 names the object); keyword
    arguments override the entry's keys (None drops one; ``{prefix}`` in a string is the prefix)."""
    tag = uuid.uuid4().hex[:8]
    app = StreamApp(folder / "durable.toml", f"ORDERS_{tag}", f"orders{tag}", f"orders-{tag}")
    entry: dict[str, Any] = {"name": app.subscription, "stream": app.stream, "subject": f"{app.prefix}.*.created",
                             "object_token": 2, "binding": "TALLIES", "max_attempts": 3}
    entry.update({k: v.format(prefix=app.prefix) if isinstance(v, str) else v for k, v in subscription.items()})
    lines = ['[bindings]', 'TALLIES = "tests.helpers.subscribers:Tally"', '',
             '[[migrations]]', 'tag = "v1"', 'new_classes = ["Tally"]', '', '[[subscriptions]]']
    for key, value in entry.items():
        if value is not None:
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    app.path.write_text("\n".join(lines) + "\n")
    return app


async def add_stream(nc: NatsClient, app: StreamApp) -> None:
    await nc.jetstream().add_stream(name=app.stream, subjects=[f"{app.prefix}.>"])


async def remove(nc: NatsClient, app: StreamApp, deployment_key: int) -> None:
    """The test's stream, and its parked messages (the dead-letter stream is shared)."""
    js = nc.jetstream()
    try:
        await js.delete_stream(app.stream)
    except NotFoundError:
        pass
    dlq = DeadLetters(deployment_key)
    try:
        await js.purge_stream(dlq.stream, subject=dlq.subject(app.subscription))
    except NotFoundError:
        pass
