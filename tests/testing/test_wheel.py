"""The package as a user gets it: the wheel built from this checkout, installed into a fresh venv
outside it, runs `durable dev` for an app in an empty folder, and its pytest plugin tests that
app. Nothing of the checkout is on the path: a file the wheel forgot (an SQL migration, the
plugin) fails here, as it did when the migrations were found relative to the checkout."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from durable.core.embedded import free_port
from durable.scaffold import PATTERNS, PLANNED

from tests.helpers.settings import ROOT

pytestmark = pytest.mark.slow  # builds the wheel and installs it with its dependencies into a venv

APP = '''
"""An app outside the library: one object class and the routing function."""
from durable import DurableObject, Env, Request, Response


class Tally(DurableObject):
    async def add(self, n: int) -> int:
        total = (await self.ctx.storage.get("total") or 0) + n
        await self.ctx.storage.put("total", total)
        return total

    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            return Response.json_response({"total": await self.add(int(request.query_param("n") or 1))})
        return Response.json_response({"total": await self.ctx.storage.get("total") or 0})


async def fetch(request: Request, env: Env) -> Response:
    parts = [p for p in request.path.split("/") if p]
    if len(parts) == 2 and parts[0] == "tally":
        return await env.TALLIES.get_by_name(parts[1]).fetch(request)
    return Response("Not found", 404)
'''

CONFIG = '''
routes = "app:fetch"

[bindings]
TALLIES = "app:Tally"

[[migrations]]
tag = "v1"
new_classes = ["Tally"]
'''

APP_TEST = '''
import asyncio
import json


async def test_tally(durable_app, env):
    await asyncio.gather(*(env.TALLIES.get_by_name("t").add(1) for _ in range(25)))
    assert await durable_app.evict(env.TALLIES.get_by_name("t"))
    response = await durable_app.fetch("/tally/t")
    assert json.loads(response.body) == {"total": 25}
'''


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel (and its dev extra) installed."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    # built from a copy of the tracked files: setuptools builds in the source tree, and a build/
    # left there from an earlier layout would slip files the checkout no longer has into the wheel
    source = base / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)])
    wheels = list(dist.glob("durable-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", f"{wheels[0]}[dev]", "pytest", "pytest-asyncio"], cwd=base)
    return venv


def _clean_environ() -> dict[str, str]:
    """The environment of a user's shell: no settings or paths of this test session."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("DURABLE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _app_folder(base: Path) -> Path:
    folder = base / "myapp"
    folder.mkdir()
    (folder / "app.py").write_text(textwrap.dedent(APP))
    (folder / "durable.toml").write_text(textwrap.dedent(CONFIG))
    return folder


def test_the_wheel_installs_durable_and_nothing_named_services(installed: Path, tmp_path: Path) -> None:
    probe = ("import importlib.util, json, durable, durable.errors, durable.testing;"
             "print(json.dumps([durable.__file__, importlib.util.find_spec('services') is None,"
             " sorted(durable.__all__)]))")
    out = _run([str(installed / "bin" / "python"), "-c", probe], cwd=tmp_path).stdout
    import json

    where, no_services, names = json.loads(out)
    assert str(installed) in where and str(ROOT) not in where
    assert no_services, "the wheel installs a top-level 'services' package"
    assert {"DurableObject", "Request", "Response", "Env", "Client", "connect"} <= set(names)
    site = next((installed / "lib").glob("python3*/site-packages"))
    assert not (site / "services").exists()
    assert sorted(p.name for p in (site / "durable" / "migrations").glob("*.sql")) == sorted(
        p.name for p in (ROOT / "infra" / "migrations").glob("*.sql"))


async def test_durable_dev_from_the_wheel_serves_an_app_outside_the_library(installed: Path, tmp_path: Path) -> None:
    folder = _app_folder(tmp_path)
    http_port = free_port()
    env = _clean_environ()
    env.update(DURABLE_HTTP_PORT=str(http_port), DURABLE_NATS_PORT=str(free_port()),
               DURABLE_POSTGRES_PORT=str(free_port()), DURABLE_GATEWAY_PORT=str(free_port()),
               DURABLE_PARTITIONS="16", PATH=f"{installed / 'bin'}:{env.get('PATH', '')}")
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen([str(installed / "bin" / "durable"), "dev"], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + 120
        while b"ready" not in (tmp_path / "dev.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "dev.log").read_text()
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            replies = await asyncio.gather(*(http.post("/tally/a?n=2") for _ in range(40)))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
            totals = sorted(r.json()["total"] for r in replies)
            assert totals == list(range(2, 82, 2)), "every increment counted exactly once"
            assert (await http.get("/tally/a")).json() == {"total": 80}
            assert (await http.get("/tally/b")).json() == {"total": 0}
            assert (await http.get("/nowhere")).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()
    assert (folder / ".durable").is_dir()


def test_the_plugin_from_the_wheel_tests_the_app(installed: Path, tmp_path: Path) -> None:
    folder = _app_folder(tmp_path)
    (folder / "test_app.py").write_text(textwrap.dedent(APP_TEST))
    (folder / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    env = _clean_environ()
    result = subprocess.run([str(installed / "bin" / "pytest"), "-q", "-p", "no:cacheprovider"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_durable_new_from_the_wheel_writes_an_app_whose_tests_pass(installed: Path, tmp_path: Path,
                                                                   pattern: str) -> None:
    env = _clean_environ()
    made = subprocess.run([str(installed / "bin" / "durable"), "new", pattern, "app"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "app"
    assert (folder / "durable.toml").is_file() and (folder / f"test_{pattern}_app.py").is_file()
    result = subprocess.run([str(installed / "bin" / "pytest"), "-q", "-p", "no:cacheprovider"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_durable_new_refuses_an_unknown_pattern_and_a_used_folder(installed: Path, tmp_path: Path) -> None:
    env = _clean_environ()
    durable = str(installed / "bin" / "durable")
    unknown = subprocess.run([durable, "new", "quantum"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown pattern 'quantum'" in unknown.stderr and "counter" in unknown.stderr
    for planned in PLANNED[:1]:  # one the specification names that has no app yet, while there is one
        refused = subprocess.run([durable, "new", planned], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "planned" in refused.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    used = subprocess.run([durable, "new", "counter", "taken"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert used.returncode == 2 and "not empty" in used.stderr
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["mine.txt"]
