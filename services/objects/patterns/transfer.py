"""Transaction patterns: money moved between two objects, and optimistic concurrency in one.

Two objects commit separately, so no transaction spans them. A transfer is therefore a *saga*
with a coordinator of its own (one :class:`Transfer` object per transfer id) that records each
step durably before taking the next:

    started -> debited (source withdrew) -> done (destination deposited)
                       \\-> the deposit is refused -> compensated (source refunded)

Every step is idempotent: the accounts remember the operation ids they applied
(``<transfer object id>:debit|credit|refund``), so a step repeated after a crash, a timeout or
a redelivery applies once. The coordinator sets an alarm when it starts and each time it
advances, so a transfer interrupted by a crash (its caller gone, its worker killed) is finished
by the alarm on whichever worker owns it next: it always ends
``done`` or ``compensated``, never with money in flight for good.

Inside one object, :meth:`Account.update_limit` shows optimistic concurrency: a client reads
``details()`` (with its ``version``), decides, and writes with ``if_version``; a concurrent change
in between makes the write fail with a conflict instead of overwriting it.
"""

from __future__ import annotations

import time
from typing import Any

from ..base import AlarmInfo, DurableObject

MAX_AMOUNT = 10**15


class InsufficientFunds(Exception):
    """The withdrawal would take the balance below the account's limit."""


class AccountClosed(Exception):
    """The account takes no more deposits or withdrawals."""


class VersionConflict(Exception):
    """The object changed since the version the caller read."""


def _amount(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_AMOUNT:
        raise ValueError(f"amount must be a positive integer up to {MAX_AMOUNT}, not {value!r}")
    return value


def _op_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise TypeError("op_id must be a non-empty str of at most 200 characters")
    return value


class Account(DurableObject):
    """RPC: ``details()``, ``deposit(amount, op_id)``, ``withdraw(amount, op_id)``,
    ``update_limit(limit, if_version)``, ``close()``. Amounts are integers (cents)."""

    async def _state(self) -> dict[str, Any]:
        state = await self.ctx.storage.get("state")
        return state if isinstance(state, dict) else {"balance": 0, "limit": 0, "version": 0, "closed": False}

    async def details(self) -> dict[str, Any]:
        return await self._state()

    async def _apply(self, op_id: str, change: int) -> dict[str, Any]:
        """Apply ``change`` once per ``op_id``: a repeated operation answers what it answered the
        first time (its outcome is stored with it, in the same commit as the balance)."""
        key = f"op:{op_id}"
        done = await self.ctx.storage.get(key)
        if isinstance(done, dict):
            return done
        state = await self._state()
        if state["closed"]:
            raise AccountClosed("the account is closed")
        if state["balance"] + change < -state["limit"]:
            raise InsufficientFunds(f"balance {state['balance']} cannot cover {-change}")
        state = {**state, "balance": state["balance"] + change, "version": state["version"] + 1}
        outcome = {"balance": state["balance"], "op_id": op_id}
        await self.ctx.storage.put({"state": state, key: outcome})
        return outcome

    async def deposit(self, amount: int, op_id: str) -> dict[str, Any]:
        return await self._apply(_op_id(op_id), _amount(amount))

    async def withdraw(self, amount: int, op_id: str) -> dict[str, Any]:
        return await self._apply(_op_id(op_id), -_amount(amount))

    async def update_limit(self, limit: int, if_version: int) -> dict[str, Any]:
        """Set the overdraft limit if nothing changed since ``if_version`` (optimistic concurrency)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_AMOUNT:
            raise ValueError(f"limit must be an integer from 0 to {MAX_AMOUNT}, not {limit!r}")
        state = await self._state()
        if if_version != state["version"]:
            raise VersionConflict(f"the account is at version {state['version']}, not {if_version!r}; "
                                  "read it again and retry")
        state = {**state, "limit": limit, "version": state["version"] + 1}
        await self.ctx.storage.put("state", state)
        return state

    async def close(self) -> dict[str, Any]:
        state = {**await self._state(), "closed": True}
        state["version"] += 1
        await self.ctx.storage.put("state", state)
        return state


class Transfer(DurableObject):
    """The coordinator of one transfer (its id is the object's name). RPC: ``start(source,
    destination, amount)`` runs it (and answers its final state), ``status()``. The accounts are
    the ``ACCOUNTS`` binding of the app (``ACCOUNTS_BINDING`` in a subclass to change it)."""

    ACCOUNTS_BINDING = "ACCOUNTS"
    #: how soon the alarm looks again at a transfer that has not ended
    RESUME_MS = 2_000

    def _accounts(self) -> Any:
        return getattr(self.env, self.ACCOUNTS_BINDING)

    async def status(self) -> dict[str, Any] | None:
        state = await self.ctx.storage.get("transfer")
        return state if isinstance(state, dict) else None

    async def start(self, source: str, destination: str, amount: int) -> dict[str, Any]:
        """Record the transfer, then run it to its end. Calling it again (a retry after a timeout)
        with the same arguments resumes the same transfer; other arguments are refused."""
        if not all(isinstance(n, str) and n for n in (source, destination)) or source == destination:
            raise ValueError("source and destination must be two different account names")
        amount = _amount(amount)
        state = await self.status()
        if state is None:
            state = {"source": source, "destination": destination, "amount": amount, "step": "started",
                     "error": None}
            await self.ctx.storage.put("transfer", state)
        elif (state["source"], state["destination"], state["amount"]) != (source, destination, amount):
            raise ValueError(f"transfer {self.ctx.id.name!r} exists with other arguments")
        return await self._run(state)

    async def _run(self, state: dict[str, Any]) -> dict[str, Any]:
        """Advance from the recorded step to the end, recording each step before the next.
        The alarm is the safety net: set before any step, it resumes a run that died."""
        accounts = self._accounts()
        # operation ids from the id, never the name: an instance woken by the alarm has no name
        name = self.ctx.id.hex
        if state["step"] not in ("done", "compensated", "failed"):
            await self.ctx.storage.set_alarm(int(time.time() * 1000) + self.RESUME_MS)
        if state["step"] == "started":
            try:
                await accounts.get_by_name(state["source"]).withdraw(state["amount"], f"{name}:debit")
            except Exception as exc:
                if not _refused(exc):
                    raise  # unreachable or reset: the step is retried (here or by the alarm)
                state = {**state, "step": "failed", "error": str(exc)}
            else:
                state = {**state, "step": "debited"}
            await self.ctx.storage.put("transfer", state)
        if state["step"] == "debited":
            try:
                await accounts.get_by_name(state["destination"]).deposit(state["amount"], f"{name}:credit")
            except Exception as exc:
                if not _refused(exc):
                    raise
                state = {**state, "step": "refunding", "error": str(exc)}
            else:
                state = {**state, "step": "done"}
            await self.ctx.storage.put("transfer", state)
        if state["step"] == "refunding":
            await accounts.get_by_name(state["source"]).deposit(state["amount"], f"{name}:refund")
            state = {**state, "step": "compensated"}
            await self.ctx.storage.put("transfer", state)
        if state["step"] in ("done", "compensated", "failed"):
            await self.ctx.storage.delete_alarm()
        return state

    async def alarm(self, info: AlarmInfo) -> None:
        """A transfer that has not ended (its run died): run it on."""
        state = await self.status()
        if state is not None:
            await self._run(state)


def _refused(exc: BaseException) -> bool:
    """An account's own refusal (funds, closed, bad amount): final, unlike an unreachable object."""
    remote_type = getattr(exc, "remote_type", None)
    return remote_type in ("InsufficientFunds", "AccountClosed", "ValueError", "TypeError")
