"""The classes users write objects with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client.namespace import Env
    from .context import Context


@dataclass(frozen=True)
class AlarmInfo:
    """What an ``alarm(info)`` handler is told about the run."""

    scheduled_time: int  #: epoch milliseconds the alarm was set for
    retry_count: int = 0

    @property
    def is_retry(self) -> bool:
        return self.retry_count > 0


class DurableObject:
    """Base class of every Durable Object: ``self.ctx`` (id, storage, gates) and ``self.env``.

    Public methods (not starting with ``_``) are RPC methods callable on a stub; ``fetch``,
    ``alarm`` and the ``websocket_*`` handlers are optional.
    """

    #: names never callable over RPC: the event handlers, which only the runtime delivers
    EVENT_HANDLERS = frozenset({"fetch", "alarm", "websocket_message", "websocket_close", "websocket_error"})

    def __init__(self, ctx: Context, env: Env) -> None:
        self.ctx = ctx
        self.env = env

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
