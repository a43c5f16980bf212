"""The object host: DurableObject, its context and storage, and the worker that runs them."""

from ..core.http import Request, Response
from .base import AlarmInfo, DurableObject
from .host import Worker
from .instance import Context
from .storage import Storage, Transaction
from .websockets import WebSocket

__all__ = ["AlarmInfo", "Context", "DurableObject", "Request", "Response", "Storage", "Transaction", "WebSocket",
           "Worker"]
