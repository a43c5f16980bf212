"""The object host: DurableObject, its context and storage, and the worker that runs them."""

from ..core.http import Request, Response
from .base import AlarmInfo, DurableObject
from .context import Context
from .sockets import WebSocket
from .storage import Storage, Transaction
from .worker import Worker

__all__ = ["AlarmInfo", "Context", "DurableObject", "Request", "Response", "Storage", "Transaction", "WebSocket",
           "Worker"]
