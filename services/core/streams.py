"""JetStream streams the runtime keeps (alarms, events, parked messages): created at start-up,
or brought up to the settings when they exist with another configuration."""

from __future__ import annotations

from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

#: JetStream's error codes: a stream name in use with another configuration; subjects that
#: overlap another stream's
STREAM_EXISTS_DIFFERENTLY = 10058
SUBJECTS_OVERLAP = 10065


async def put_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to ``config`` if it exists differently (its messages stay)."""
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_EXISTS_DIFFERENTLY:
            raise
        await js.update_stream(config)
