"""JetStream streams the runtime keeps (alarms, events, parked messages): created at start-up,
or brought up to the settings when they exist with another configuration."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, ServiceUnavailableError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

log = logging.getLogger("durable.worker")
T = TypeVar("T")

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


#: what a JetStream that is not ready yet answers (a cluster still electing its meta leader, a
#: server still starting): worth waiting for at start-up, unlike a refusal
_NOT_READY = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)


async def when_jetstream_ready(step: Callable[[], Awaitable[T]], what: str, within: float = 60.0) -> T:
    """Run a start-up step against JetStream, waiting (up to ``within`` seconds) while JetStream
    is not ready yet; a refusal (a ConfigError, a bad request) is raised at once."""
    async for attempt in AsyncRetrying(retry=retry_if_exception_type(_NOT_READY), stop=stop_after_delay(within),
                                       wait=wait_random_exponential(multiplier=0.2, max=2.0), reraise=True,
                                       before_sleep=lambda state: log.warning(
                                           "JetStream not ready for %s yet (%s); waiting", what,
                                           type(state.outcome.exception()).__name__ if state.outcome else "?")):
        with attempt:
            return await step()
    raise AssertionError("unreachable: AsyncRetrying reraises")
