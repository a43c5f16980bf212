"""`durable worker`, `router` and `gateway` as processes: what they refuse before they start
serving, each said in one paragraph, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from durable.core.embedded import free_port

from tests.helpers.settings import ROOT, TEST_CONFIG


@pytest.mark.parametrize("command", ["worker", "router", "gateway"])
def test_processes_refuse_the_development_id_secret(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update({"DURABLE_NATS_URL": "nats://127.0.0.1:1", "DURABLE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                "DURABLE_CONFIG_FILE": str(TEST_CONFIG), "PYTHONPATH": str(ROOT)})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "durable.cli", command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"durable {command} refuses to run with the development id secret" in proc.stderr
    assert "DURABLE_ID_SECRET" in proc.stderr
    message = proc.stderr.split("configuration error:\n", 1)[1].strip()
    assert "\n" not in message  # one paragraph
    assert time.monotonic() - started < 30  # refused before anything is contacted


def test_a_worker_whose_nats_is_down_exits_with_one_line_naming_it(tmp_path: Path) -> None:
    """`durable worker` bounds its first connect like any client, and says so without a traceback."""
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "DURABLE_NATS_URL": url, "DURABLE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
           "DURABLE_ID_SECRET": "a-production-secret-for-this-test", "DURABLE_NATS_CONNECT_TIMEOUT": "1",
           "DURABLE_CONFIG_FILE": str(ROOT / "durable.toml")}
    result = subprocess.run([sys.executable, "-m", "durable.cli", "worker"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and "DURABLE_NATS_URL" in lines[0], result.stderr
