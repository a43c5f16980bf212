"""Ready-made objects."""

from .counter import Counter
from .rate_limiter import RateLimiter

__all__ = ["Counter", "RateLimiter"]
