"""Ready-made objects."""

from .counter import Counter
from .rate_limiter import RateLimiter
from .session import Session

__all__ = ["Counter", "RateLimiter", "Session"]
