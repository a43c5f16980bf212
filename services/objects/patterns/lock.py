"""Lock: a distributed lock with fencing tokens, TTL expiry by alarm and a fair queue of waiters.

One object per lock name. ``acquire(owner, ttl_ms)`` grants the lock with a *fencing token*
that strictly increases over the lock's whole life (it is never reset, not even when the lock
is idle), so whatever the lock protects can refuse a write carrying an older token than one it
has seen: a holder that was paused (GC, SIGSTOP, a partition) past its TTL and wakes up still
believing it holds the lock cannot write (Kleppmann's fencing). ``guarded_write`` is that check
for data kept in the lock object itself; :func:`check_fence` is the same check for any other
object's storage.

Expiry: the lock's alarm fires at the holder's deadline and frees it, so a holder that vanished
loses the lock at its TTL without anyone polling. ``renew`` extends a live hold.

Waiting: a caller that passes ``wait_ms`` joins a FIFO queue and polls ``acquire`` again (the
:class:`durable.client.lock.LockClient` helper does); when the lock is free, only the waiter at
the head may take it. A waiter that stops polling for ``WAITER_STALE_MS`` or whose ``wait_ms``
ran out leaves the queue, so a vanished waiter blocks the others for a few seconds at most.
Events of one object never interleave while it touches only its storage, so every step below is
atomic; ``now_ms`` is the clock, replaced by tests in a subclass.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject
from ..storage import Storage

MAX_OWNER_CHARS = 256
MAX_TTL_MS = 24 * 3600 * 1000
MIN_TTL_MS = 100
MAX_WAIT_MS = 10 * 60 * 1000
MAX_WAITERS = 1000


class StaleToken(Exception):
    """A write carried a fencing token older than one the resource has seen (or than the holder's)."""


def _owner(owner: Any) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS:
        raise TypeError(f"owner must be a non-empty str of at most {MAX_OWNER_CHARS} characters")
    return owner


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


async def check_fence(storage: Storage, resource: str, token: Any) -> None:
    """In any object: refuse ``token`` if a higher one was already used on ``resource``, else
    remember it. Call it in the same event as the write it guards (before the write), so the
    check and the write are atomic; raises :class:`StaleToken`."""
    token = _int(token, "token", 1, 2**62)
    key = f"fence:{resource}"
    seen = await storage.get(key)
    if isinstance(seen, int) and token < seen:
        raise StaleToken(f"fencing token {token} is older than {seen}, already used on {resource!r}")
    if seen != token:
        await storage.put(key, token)


class Lock(DurableObject):
    """RPC: ``acquire(owner, ttl_ms, wait_ms=0)``, ``renew(owner, token, ttl_ms)``,
    ``release(owner, token)``, ``status()``, ``guarded_write(owner, token, key, value)``,
    ``read(key)``. HTTP: ``POST /lock/<name>/acquire|renew|release|write`` with a JSON body of
    the same arguments, ``GET /lock/<name>``."""

    #: a waiter not heard from (an acquire poll) for this long leaves the queue
    WAITER_STALE_MS = 3_000
    #: how often a waiter is told to poll
    POLL_MS = 200

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    # ----- state ------------------------------------------------------------------------------

    async def _load(self, now: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
        """The live holder (None if free or expired), the live waiters, and whether either changed."""
        stored = await self.ctx.storage.get(["holder", "queue"])
        holder = stored.get("holder")
        queue = [w for w in stored.get("queue") or () if isinstance(w, dict)]
        changed = False
        if isinstance(holder, dict) and holder["expires_ms"] <= now:
            holder, changed = None, True
        live = [w for w in queue if w["until_ms"] > now and w["seen_ms"] + self.WAITER_STALE_MS > now]
        return (holder if isinstance(holder, dict) else None), live, changed or len(live) != len(queue)

    async def _save(self, holder: dict[str, Any] | None, queue: list[dict[str, Any]]) -> None:
        """Write the state and set the alarm for its next deadline (the holder's expiry, or when
        the head waiter's claim runs out), or delete the alarm when nothing is pending."""
        storage = self.ctx.storage
        await storage.put("queue", queue)
        if holder is None:
            await storage.delete("holder")
        else:
            await storage.put("holder", holder)
        deadlines = [holder["expires_ms"]] if holder else []
        deadlines += [min(w["until_ms"], w["seen_ms"] + self.WAITER_STALE_MS) for w in queue[:1]]
        if deadlines:
            await storage.set_alarm(min(deadlines))
        else:
            await storage.delete_alarm()

    # ----- the lock ---------------------------------------------------------------------------

    async def acquire(self, owner: str, ttl_ms: int, wait_ms: int = 0) -> dict[str, Any]:
        """Take the lock for ``ttl_ms`` if it is free (and no earlier waiter is ahead): answers
        ``{"acquired": True, "token", "expires_ms"}``. Otherwise ``{"acquired": False, ...}``;
        with ``wait_ms`` the caller is queued (its place kept while it polls) and told where it is."""
        owner = _owner(owner)
        ttl_ms = _int(ttl_ms, "ttl_ms", MIN_TTL_MS, MAX_TTL_MS)
        wait_ms = _int(wait_ms, "wait_ms", 0, MAX_WAIT_MS)
        now = self.now_ms()
        holder, queue, _ = await self._load(now)
        if holder is not None and holder["owner"] == owner:
            return {"acquired": True, "token": holder["token"], "expires_ms": holder["expires_ms"]}
        mine = next((w for w in queue if w["owner"] == owner), None)
        if holder is None and (not queue or queue[0]["owner"] == owner):
            token = int(await self.ctx.storage.get("last_token") or 0) + 1
            holder = {"owner": owner, "token": token, "expires_ms": now + ttl_ms}
            queue = [w for w in queue if w["owner"] != owner]
            await self.ctx.storage.put("last_token", token)
            await self._save(holder, queue)
            return {"acquired": True, "token": token, "expires_ms": holder["expires_ms"]}
        if wait_ms > 0 or mine is not None:
            if mine is None:
                if len(queue) >= MAX_WAITERS:
                    raise ValueError(f"the lock has {MAX_WAITERS} waiters already")
                mine = {"owner": owner, "until_ms": now + wait_ms}
                queue.append(mine)
            mine["seen_ms"] = now
            await self._save(holder, queue)
        result: dict[str, Any] = {"acquired": False, "retry_after_ms": self.POLL_MS,
                                  "holder_expires_ms": holder["expires_ms"] if holder else None}
        if mine is not None:
            result["position"] = queue.index(mine) + 1
            result["wait_until_ms"] = mine["until_ms"]
        return result

    async def renew(self, owner: str, token: int, ttl_ms: int) -> dict[str, Any]:
        """Extend a live hold to ``ttl_ms`` from now; ``{"renewed": False}`` if it is not held
        by ``owner`` with ``token`` any more (expired, released, taken over)."""
        owner = _owner(owner)
        token = _int(token, "token", 1, 2**62)
        ttl_ms = _int(ttl_ms, "ttl_ms", MIN_TTL_MS, MAX_TTL_MS)
        now = self.now_ms()
        holder, queue, changed = await self._load(now)
        if holder is None or holder["owner"] != owner or holder["token"] != token:
            if changed:
                await self._save(holder, queue)
            return {"renewed": False}
        holder["expires_ms"] = now + ttl_ms
        await self._save(holder, queue)
        return {"renewed": True, "expires_ms": holder["expires_ms"]}

    async def release(self, owner: str, token: int) -> bool:
        """Give the lock up; False if ``owner`` with ``token`` did not hold it (nothing changes)."""
        owner = _owner(owner)
        token = _int(token, "token", 1, 2**62)
        holder, queue, changed = await self._load(self.now_ms())
        if holder is None or holder["owner"] != owner or holder["token"] != token:
            if changed:
                await self._save(holder, queue)
            return False
        await self._save(None, queue)
        return True

    async def status(self) -> dict[str, Any]:
        holder, queue, _ = await self._load(self.now_ms())
        return {"holder": holder, "waiters": [w["owner"] for w in queue],
                "last_token": int(await self.ctx.storage.get("last_token") or 0)}

    async def guarded_write(self, owner: str, token: int, key: str, value: Any) -> dict[str, Any]:
        """Write ``value`` under ``key`` only for the live holder's token (and never for a token
        older than one already written with): a former holder's late write is refused."""
        owner = _owner(owner)
        token = _int(token, "token", 1, 2**62)
        if not isinstance(key, str) or not key:
            raise TypeError("key must be a non-empty str")
        holder, _, _ = await self._load(self.now_ms())
        if holder is None or holder["owner"] != owner or holder["token"] != token:
            current = None if holder is None else holder["token"]
            return {"written": False, "reason": f"token {token} does not hold the lock (holder's token: {current})"}
        try:
            await check_fence(self.ctx.storage, "data", token)
        except StaleToken as exc:
            return {"written": False, "reason": str(exc)}
        await self.ctx.storage.put(f"data:{key}", value)
        return {"written": True, "token": token}

    async def read(self, key: str) -> Any:
        if not isinstance(key, str) or not key:
            raise TypeError("key must be a non-empty str")
        return await self.ctx.storage.get(f"data:{key}")

    async def alarm(self, info: AlarmInfo) -> None:
        """A deadline passed: free an expired hold, drop waiters that left, set the next alarm."""
        holder, queue, _ = await self._load(self.now_ms())
        await self._save(holder, queue)

    # ----- HTTP --------------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if not action:
            if request.method != "GET":
                return Response.json_response({"error": "use GET for the lock's status"}, 405, {"allow": "GET"})
            return Response.json_response(await self.status())
        calls: dict[str, Callable[..., Awaitable[Any]]] = {
            "acquire": self.acquire, "renew": self.renew, "release": self.release, "write": self.guarded_write}
        call = calls.get(action)
        if call is None or len(segments) != 3:
            return Response.json_response({"error": "not found"}, 404)
        if request.method != "POST":
            return Response.json_response({"error": f"use POST to {action}"}, 405, {"allow": "POST"})
        try:
            args = request.json_object()
            result = await call(**args)
        except (TypeError, ValueError) as exc:
            return Response.json_response({"error": str(exc)}, 400)
        if action == "release":
            result = {"released": result}
        conflict = (action == "write" and not result["written"]) or (action == "release" and not result["released"])
        return Response.json_response(result, 409 if conflict else 200)
