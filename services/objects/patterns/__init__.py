"""Ready-made objects."""

from .auction import Auction, BidRefused
from .chat_room import ChatRoom
from .collab import CollabDocument
from .counter import Counter
from .game import Game
from .lock import Lock, StaleToken, check_fence
from .presence import Presence, PresenceRoom
from .rate_limiter import RateLimiter
from .session import Session
from .stream import StreamChannel
from .transfer import Account, Transfer

__all__ = [
    "Account",
    "Auction",
    "BidRefused",
    "ChatRoom",
    "CollabDocument",
    "Counter",
    "Game",
    "Lock",
    "Presence",
    "PresenceRoom",
    "RateLimiter",
    "Session",
    "StaleToken",
    "StreamChannel",
    "Transfer",
    "check_fence",
]
