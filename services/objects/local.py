"""Requests from a Client in this process to partitions this worker serves, without NATS.

``durable dev`` (and any single-host deployment) runs the router and a worker in one process;
a request from the router to an object whose partition that worker serves would otherwise
cross NATS twice (request, reply) to come back to the same process. Here it is handed to the
worker's Dispatcher directly and its reply comes back through a future.

Only the hop is skipped: the request is the same subject, bytes and headers a NATS message
would carry, decoded and checked by the same code (input gate, size limit, fencing, output
gate, metrics, tail, the partition's begin/end accounting that a hand-over waits on). A
partition this worker does not serve now (not owned, being handed over, lease not valid) is
not taken: :meth:`LocalDispatcher.dispatch` answers None and the caller goes over NATS, where
the owner is. A request taken just as a hand-over begins is refused by the dispatcher with
NotOwner, which the caller retries, as it does over NATS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..core.tasks import TaskSet
from ..core.wire import PARTITIONED_PREFIX
from .dispatch import Dispatcher, LocalReply, LocalRequest
from .partitions import Partitions


class LocalDispatcher:
    """The worker side of ``Client.local`` (services/client/client.py ``LocalDispatch``)."""

    def __init__(self, partitions: Partitions, dispatcher: Dispatcher, owns: Callable[[int, int], bool],
                 tasks: TaskSet) -> None:
        self.partitions = partitions
        self.dispatcher = dispatcher
        self._owns = owns
        #: the handlers run as tasks of their own, kept with the NATS ones (a stop waits for both)
        self.tasks = tasks
        #: requests taken here (and not over NATS) since start (the tests check which path a call took)
        self.taken = 0

    def dispatch(self, subject: str, payload: bytes,
                 headers: dict[str, str] | None) -> asyncio.Future[LocalReply] | None:
        """Start the request if this worker serves its partition now, and return the future of
        its reply; None if it does not (the caller sends it over NATS)."""
        prefix, _, rest = subject.partition(".")
        number, _, _ = rest.partition(".")
        if prefix != PARTITIONED_PREFIX or not number.isdigit():
            return None
        state = self.partitions.serving(int(number))
        # subscribed: NATS would deliver nothing before; owned under a valid lease: not fenced
        if state is None or state.sub is None or not self._owns(state.partition, state.epoch):
            return None
        future: asyncio.Future[LocalReply] = asyncio.get_running_loop().create_future()
        request = LocalRequest(subject, payload, dict(headers) if headers else None)
        self.dispatcher.last_request = time.monotonic()
        state.begin()
        self.taken += 1
        self.tasks.spawn(self.dispatcher.handle_local(state, request, future))
        return future
