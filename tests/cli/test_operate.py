"""The operator's commands against a running worker on real NATS and Postgres: objects ls,
state get/put/delete/export/import, alarms ls, call, tail, doctor; a state put racing traffic;
bad input as one line and exit code 2."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.errors import DurableError
from durable.core.settings import Settings
from durable.objects import Worker
from durable.operate import commands, tailer
from durable.operate.target import UsageError

from tests.helpers.settings import ROOT, worker_env
from tests.helpers.waiting import assert_eventually


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="durable")
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def run(settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = await commands._dispatch(parse(*argv), settings, config)
    return code, capsys.readouterr().out


async def names_recorded(settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str],
                         binding: str, count: int) -> None:
    """Until the worker's background writer has recorded ``count`` names (it writes every second)."""
    async def recorded() -> bool:
        _, out = await run(settings, config, capsys, "objects", "ls", binding, "--json")
        return sum(1 for r in json.loads(out) if r["name"]) >= count

    await assert_eventually(recorded, timeout=10, message="object names recorded")


async def test_objects_ls_lists_names_keys_and_alarms(worker: Worker, env: Env, settings: Settings,
                                                      config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    for name, n in (("apple", 1), ("apricot", 2), ("banana", 3)):
        await env.COUNTERS.get_by_name(name).increment(n)
    unnamed = env.COUNTERS.new_unique_id()
    await env.COUNTERS.get(unnamed).increment(7)
    await env.ALARMERS.get_by_name("later").arm(3_600_000)
    await names_recorded(settings, config, capsys, "COUNTERS", 3)
    await names_recorded(settings, config, capsys, "ALARMERS", 1)

    code, out = await run(settings, config, capsys, "objects", "ls", "COUNTERS", "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert len(rows) == 4
    by_name = {r["name"]: r for r in rows.values() if r["name"]}
    assert sorted(by_name) == ["apple", "apricot", "banana"]
    assert rows[unnamed.hex]["name"] is None and rows[unnamed.hex]["keys"] == 1
    assert all(r["bytes"] > 0 and r["last_write"] for r in rows.values())

    code, out = await run(settings, config, capsys, "objects", "ls", "COUNTERS", "--limit", "2", "--json")
    assert [r["name"] for r in json.loads(out)] == ["apple", "apricot"]  # named first, by name
    code, out = await run(settings, config, capsys, "objects", "ls", "Counter", "--prefix", "ap")
    assert code == 0 and "apple" in out and "apricot" in out and "banana" not in out and "(2 objects" in out

    code, out = await run(settings, config, capsys, "objects", "ls", "ALARMERS", "--json")
    (alarmer,) = json.loads(out)
    assert alarmer["name"] == "later" and alarmer["alarm"]

    code, out = await run(settings, config, capsys, "alarms", "ls", "--json")
    assert [a["name"] for a in json.loads(out)] == ["later"]
    code, out = await run(settings, config, capsys, "alarms", "ls", "--overdue", "--json")
    assert json.loads(out) == []


async def test_state_get_put_delete_export_import(worker: Worker, env: Env, settings: Settings, config: AppConfig,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    counter = env.COUNTERS.get_by_name("inspected")
    await counter.increment(5)
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", "inspected")
    assert code == 0 and json.loads(out) == {"value": 5}
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", counter.id.hex, "value")
    assert json.loads(out) == 5

    code, out = await run(settings, config, capsys, "state", "put", "COUNTERS", "inspected", "value", "41")
    assert code == 0 and json.loads(out)["put"] == 1
    assert await counter.increment() == 42  # the live object sees the operator's write
    code, _ = await run(settings, config, capsys, "state", "put", "COUNTERS", "inspected", "blob",
                        '{"$bytes": "AAEC"}')
    assert code == 0

    export = tmp_path / "state.jsonl"
    code, _ = await run(settings, config, capsys, "state", "export", "COUNTERS", "inspected", "-o", str(export))
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert lines == [{"key": "blob", "value": {"$bytes": "AAEC"}}, {"key": "value", "value": 42}]

    code, out = await run(settings, config, capsys, "state", "delete", "COUNTERS", "inspected", "value")
    assert code == 0 and json.loads(out)["deleted"] == 1
    assert await counter.get() == 0

    copy = env.COUNTERS.get_by_name("copy")
    await copy.increment(1000)
    code, out = await run(settings, config, capsys, "state", "import", "COUNTERS", "copy", str(export), "--replace")
    assert code == 0 and json.loads(out) == {"put": 2, "deleted": 0, "wiped": 1}
    assert await copy.get() == 42
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", "copy", "blob")
    assert json.loads(out) == {"$bytes": "AAEC"}

    code, _ = await run(settings, config, capsys, "state", "delete", "COUNTERS", "copy", "--all")
    assert code == 0
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", "copy")
    assert json.loads(out) == {}


async def test_a_state_put_racing_traffic_goes_through_the_gates(
        worker: Worker, env: Env, settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    counter = env.COUNTERS.get_by_name("raced")
    returned: list[int] = []
    failed = 0
    warmed_up = asyncio.Event()

    async def traffic() -> None:
        nonlocal failed
        for _ in range(150):
            try:
                returned.append(await counter.increment())
            except DurableError:  # queued behind the operator's write when the object reset
                failed += 1
            if len(returned) >= 50:
                warmed_up.set()

    async def operator() -> int:
        await warmed_up.wait()
        code, _ = await run(settings, config, capsys, "state", "put", "COUNTERS", "raced", "value", "1000000")
        return code

    results = await asyncio.gather(*(traffic() for _ in range(4)), operator())
    assert results[-1] == 0
    before = sorted(v for v in returned if v < 1_000_000)
    after = sorted(v for v in returned if v > 1_000_000)
    # every increment ran entirely before or entirely after the put: none was lost under it
    assert before == list(range(1, len(before) + 1)) and len(before) >= 50
    assert after == list(range(1_000_001, 1_000_001 + len(after)))
    assert await counter.get() == 1_000_000 + len(after)
    assert len(before) + len(after) + failed == 600


async def test_call_runs_a_method(worker: Worker, env: Env, settings: Settings, config: AppConfig,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await run(settings, config, capsys, "call", "COUNTERS", "called", "increment", "[5]")
    assert code == 0 and json.loads(out) == 5
    code, out = await run(settings, config, capsys, "call", "Counter", "called", "increment", '{"by": 2}')
    assert json.loads(out) == 7
    code, out = await run(settings, config, capsys, "call", "COUNTERS", "called", "get")
    assert json.loads(out) == 7


@pytest.mark.parametrize(("argv", "words"), [
    (("objects", "ls", "NOPE"), "no binding or class named 'NOPE'"),
    (("state", "get", "COUNTERS", "x" * 2000), "object names cannot be longer than 1024 bytes"),
    (("state", "put", "COUNTERS", "x", "value", "{not json"), "not JSON"),
    (("state", "put", "COUNTERS", "x", "k" * 3000, "1"), "Keys cannot be larger than 2048 bytes"),
    (("state", "delete", "COUNTERS", "x"), "name one key, or --all"),
    (("call", "COUNTERS", "x", "no_such_method"), "has no RPC method 'no_such_method'"),
    (("call", "COUNTERS", "x", "increment", "[1,"), "not JSON"),
    (("call", "COUNTERS", "x", "_private"), "private"),
])
async def test_bad_input_is_a_usage_error(worker: Worker, settings: Settings, config: AppConfig,
                                          argv: tuple[str, ...], words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        await commands._dispatch(parse(*argv), settings, config)


async def test_bad_input_from_the_command_line_is_one_line_and_exit_code_2(
        worker: Worker, settings: Settings, tmp_path: Path) -> None:
    env = worker_env(settings)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "value": 1}\n[1, 2]\n')
    for argv in (["objects", "ls", "NOPE"], ["state", "import", "COUNTERS", "x", str(bad)],
                 ["call", "COUNTERS", "x", "increment", "nope"]):
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "durable.cli", *argv], env=env,
                                       cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


async def test_tail_shows_requests_errors_and_log_lines_of_one_object(
        worker: Worker, env: Env, settings: Settings) -> None:
    seen: list[dict[str, Any]] = []
    stop = asyncio.Event()
    ns = env.COUNTERS
    target = ns.id_from_name("tailed").hex
    task = asyncio.create_task(tailer.tail(env.client.nc, settings.deployment_key, "Counter", target,
                                           seen.append, stop))
    try:
        async def tailing() -> bool:
            await ns.get_by_name("tailed").increment()
            await ns.get_by_name("other").increment()
            return any(e["kind"] == "request" for e in seen)

        await assert_eventually(tailing, timeout=10, message="the worker publishing tail events")
        with pytest.raises(DurableError):
            await ns.get_by_name("tailed").increment("not a number")

        async def error_seen() -> bool:
            return any(e.get("outcome") not in (None, "ok") for e in seen)

        await assert_eventually(error_seen, timeout=10, message="the failed request in the tail")
    finally:
        stop.set()
        await task
    assert {e["object_id"] for e in seen} == {target}  # only the object asked for
    request = next(e for e in seen if e["kind"] == "request" and e["outcome"] == "ok")
    assert request["verb"] == "rpc.increment" and request["ms"] >= 0
    failed = next(e for e in seen if e.get("outcome") not in (None, "ok"))
    assert "integer" in failed["error"]
    assert "rpc.increment" in tailer.render(request)


async def test_doctor_reports_on_a_running_system(worker: Worker, settings: Settings, config: AppConfig,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await run(settings, config, capsys, "doctor")
    assert "[ok  ] nats: nats-server" in out and "JetStream on" in out
    assert "[ok  ] postgres: PostgreSQL" in out and "[ok  ] schema: applied: 001_schema.sql" in out
    assert "[ok  ] workers: 1 answering" in out
    assert "clock (worker" in out
    assert code == (1 if "[FAIL]" in out else 0)
    assert "[FAIL]" not in out, out


async def test_doctor_names_what_is_missing(settings: Settings, config: AppConfig,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    broken = settings.model_copy(update={"nats_url": "nats://127.0.0.1:1",
                                         "database_url": "postgresql://nobody@127.0.0.1:1/none"})
    code, out = await run(broken, config, capsys, "doctor")
    assert code == 1
    assert "[FAIL] nats: cannot connect" in out and "fix: start nats-server" in out
    assert "[FAIL] postgres: cannot connect" in out


async def test_a_name_that_looks_like_an_id_still_names_its_object(
        worker: Worker, env: Env, settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    digest = "ab" * 32  # 64 hex digits, but not an id of this namespace
    await env.COUNTERS.get_by_name(digest).increment(3)
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", digest, "value")
    assert code == 0 and json.loads(out) == 3
    real_id = env.COUNTERS.id_from_name(digest).hex
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", real_id, "value")
    assert json.loads(out) == 3


async def test_an_import_refuses_a_bad_entry_before_writing_anything(
        worker: Worker, env: Env, settings: Settings, config: AppConfig, tmp_path: Path) -> None:
    counter = env.COUNTERS.get_by_name("kept")
    await counter.increment(9)
    lines = [json.dumps({"key": f"k{n:05d}", "value": "v" * 1000}) for n in range(2000)]  # several chunks
    lines.append(json.dumps({"key": "huge", "value": "x" * 200_000}))  # storage refuses this one
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match="Values cannot be larger"):
        await commands._dispatch(parse("state", "import", "COUNTERS", "kept", str(bad), "--replace"), settings, config)
    assert await counter.get() == 9  # not wiped, nothing imported


async def test_export_and_import_carry_the_alarm(worker: Worker, env: Env, settings: Settings, config: AppConfig,
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = env.ALARMERS.get_by_name("timed")
    when = await source.arm(3_600_000)
    dump = tmp_path / "timed.jsonl"
    code, _ = await run(settings, config, capsys, "state", "export", "ALARMERS", "timed", "-o", str(dump))
    assert code == 0 and json.loads(dump.read_text().splitlines()[-1]) == {"alarm": when}
    code, _ = await run(settings, config, capsys, "state", "import", "ALARMERS", "copy", str(dump), "--replace")
    assert code == 0
    assert await env.ALARMERS.get_by_name("copy").get_alarm() == when
    with pytest.raises(UsageError, match="no alarm\\(\\) handler"):  # a class without one: refused, nothing written
        await commands._dispatch(parse("state", "import", "COUNTERS", "alarmless", str(dump)), settings, config)
    code, out = await run(settings, config, capsys, "state", "get", "COUNTERS", "alarmless")
    assert json.loads(out) == {}


async def test_an_operator_repairs_an_object_whose_constructor_fails_on_its_state(
        worker: Worker, env: Env, settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    fragile = env.FRAGILE.get_by_name("broken")
    await fragile.set_config("not a map")  # the live instance took it; the next one will not start
    code, _ = await run(settings, config, capsys, "state", "put", "FRAGILE", "broken", "value", "1")
    assert code == 0  # the object was reset after the write, and was not constructed for it
    with pytest.raises(DurableError, match="config must be a map"):
        await fragile.get_config()
    code, _ = await run(settings, config, capsys, "state", "put", "FRAGILE", "broken", "config", '{"mode": "fixed"}')
    assert code == 0
    assert await fragile.get_config() == {"mode": "fixed"}
