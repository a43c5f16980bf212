"""Transaction patterns: a transfer between two accounts as an idempotent saga (money conserved
through refusals, retries and a worker killed mid-way), and optimistic concurrency in one object."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from durable.client import Env
from durable.core.errors import DurableError, RemoteError
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess


async def _open(env: Env, name: str, balance: int) -> None:
    await env.ACCOUNTS.get_by_name(name).deposit(balance, f"open-{name}")


async def _balance(env: Env, name: str) -> int:
    return int((await env.ACCOUNTS.get_by_name(name).details())["balance"])


async def test_a_transfer_moves_money_once_however_often_it_is_asked(worker: Worker, env: Env) -> None:
    await _open(env, "alice", 100)
    transfer = env.TRANSFERS.get_by_name("t-1")
    assert (await transfer.start("alice", "bob", 30))["step"] == "done"
    assert (await transfer.start("alice", "bob", 30))["step"] == "done"  # a retry: nothing moves twice
    assert (await _balance(env, "alice"), await _balance(env, "bob")) == (70, 30)
    with pytest.raises(RemoteError, match="other arguments"):
        await transfer.start("alice", "bob", 31)
    # the same operation id applied again by an account answers the first outcome
    assert (await env.ACCOUNTS.get_by_name("alice").withdraw(30, f"{transfer.id.hex}:debit"))["balance"] == 70


async def test_insufficient_funds_fail_the_transfer_and_move_nothing(worker: Worker, env: Env) -> None:
    await _open(env, "poor", 10)
    state = await env.TRANSFERS.get_by_name("t-poor").start("poor", "rich", 50)
    assert state["step"] == "failed" and "cannot cover" in state["error"]
    assert (await _balance(env, "poor"), await _balance(env, "rich")) == (10, 0)


async def test_a_refused_credit_is_compensated(worker: Worker, env: Env) -> None:
    await _open(env, "payer", 100)
    await env.ACCOUNTS.get_by_name("closed-acct").close()
    state = await env.TRANSFERS.get_by_name("t-closed").start("payer", "closed-acct", 40)
    assert state["step"] == "compensated" and "closed" in state["error"]
    assert await _balance(env, "payer") == 100  # refunded
    assert await env.TRANSFERS.get_by_name("t-closed").status() == state


async def test_concurrent_transfers_both_ways_conserve_the_total(worker: Worker, env: Env) -> None:
    await _open(env, "x", 500)
    await _open(env, "y", 500)

    async def move(i: int) -> str:
        source, destination = ("x", "y") if i % 2 else ("y", "x")
        return str((await env.TRANSFERS.get_by_name(f"t-both-{i}").start(source, destination, 7 + i))["step"])

    steps = await asyncio.gather(*(move(i) for i in range(30)))
    assert set(steps) == {"done"}
    assert await _balance(env, "x") + await _balance(env, "y") == 1000


async def test_optimistic_concurrency_refuses_a_write_based_on_a_stale_read(worker: Worker, env: Env) -> None:
    account = env.ACCOUNTS.get_by_name("occ")
    first, second = await account.details(), await account.details()  # two clients read version 0
    assert (await account.update_limit(50, first["version"]))["limit"] == 50
    with pytest.raises(RemoteError, match="read it again") as conflict:
        await account.update_limit(80, second["version"])
    assert conflict.value.remote_type == "VersionConflict"
    fresh = await account.details()
    assert (await account.update_limit(80, fresh["version"]))["limit"] == 80


async def test_bad_amounts_and_names_are_refused(worker: Worker, env: Env) -> None:
    for args in (("a", "b", 0), ("a", "b", -5), ("a", "b", "10"), ("a", "a", 5), ("", "b", 5)):
        with pytest.raises(RemoteError):
            await env.TRANSFERS.get_by_name("t-bad").start(*args)
    assert await env.TRANSFERS.get_by_name("t-bad").status() is None
    with pytest.raises(RemoteError):
        await env.ACCOUNTS.get_by_name("a").deposit(5, "")


class CrashingWorker(WorkerProcess):
    def env(self) -> dict[str, str]:
        return {**super().env(), "DURABLE_TEST_CRASH": "1"}


@pytest.mark.fault
async def test_a_worker_killed_between_debit_and_credit_leaves_the_alarm_to_finish(
        settings: Settings, start_worker: WorkerFactory, env: Env, tmp_path: Path) -> None:
    doomed = CrashingWorker(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        await _open(env, "crash-source", 100)
        transfer = env.CRASHING_TRANSFERS.get_by_name("t-crash")
        with pytest.raises(DurableError):  # the worker running it died under the call
            await transfer.start("crash-source", "crash-destination", 25)
        assert doomed.proc is not None and doomed.proc.wait(10) == -9
        await start_worker()  # takes the partitions once the dead worker's lease runs out
        # watched through a stub that does not carry the name: the alarm, not a named call,
        # wakes the transfer on the new worker (an instance woken so knows only its id)
        by_id = env.CRASHING_TRANSFERS.get(env.CRASHING_TRANSFERS.id_from_string(transfer.id.hex))

        async def finished() -> bool:
            state = await by_id.status()
            return state is not None and state["step"] == "done"

        await assert_eventually(finished, timeout=40, message="the alarm finishing the transfer")
        assert (await _balance(env, "crash-source"), await _balance(env, "crash-destination")) == (75, 25)
    finally:
        doomed.close()
