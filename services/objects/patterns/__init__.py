"""Ready-made objects."""

from .chat_room import ChatRoom
from .counter import Counter
from .rate_limiter import RateLimiter
from .session import Session

__all__ = ["ChatRoom", "Counter", "RateLimiter", "Session"]
