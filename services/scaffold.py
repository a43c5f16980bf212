"""``durable new <pattern> [dir]``: a runnable application in a new folder, from the example apps.

The example apps of the repository (``examples/<app>``) ship in the package as data
(``durable.examples``), so the command works from an installed wheel: it copies one app's
``durable.toml``, routes module, tests and page, and adds what a folder of its own needs to run
them (a pytest.ini for pytest-asyncio, a README, a .gitignore for ``.durable/``).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .core.errors import ConfigError

#: pattern name (as typed) -> example app folder
PATTERNS = {
    "counter": "counter",
    "ratelimit": "ratelimit",
    "session": "session",
    "chat": "chat",
    "lock": "lock",
    "auction": "auction",
    "presence": "presence",
    "stream": "stream",
    "game": "game",
    "collab": "collab",
    "orders": "orders",
}
#: patterns of the specification not available as an app yet
PLANNED: tuple[str, ...] = ()

_PYTEST_INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

_README = """# {name}

A `{pattern}` application on durable (Durable Objects on NATS and PostgreSQL), made by
`durable new {pattern}`.

    durable dev          # NATS, Postgres, a worker and the router on http://127.0.0.1:8787
    pytest -q            # its tests, on real NATS and Postgres started by the durable plugin

`durable.toml` names the routing function and binds the object classes; the module it names
routes each request to an object. Change them as your app grows.
"""


def _copy(source: Traversable, target: Path) -> list[Path]:
    written = []
    for item in source.iterdir():
        if item.name in ("__pycache__", "node_modules") or item.name.endswith(".pyc"):
            continue
        if item.is_dir():
            target.joinpath(item.name).mkdir()
            written += _copy(item, target / item.name)
        else:
            path = target / item.name
            path.write_bytes(item.read_bytes())
            written.append(path)
    return written


def new_app(pattern: str, folder: Path | None = None) -> list[Path]:
    """Write the ``pattern`` app into ``folder`` (default ./<pattern>); returns the files written.
    Refuses an unknown pattern and a folder that exists and is not empty (nothing is written)."""
    app = PATTERNS.get(pattern)
    if app is None:
        planned = f" ({pattern} is planned, not available yet)" if pattern in PLANNED else ""
        raise ConfigError(f"unknown pattern {pattern!r}{planned}; available: {', '.join(sorted(PATTERNS))}")
    folder = Path(folder or pattern)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} exists and is not empty: choose a new folder")
    source = resources.files("durable.examples").joinpath(app)
    if not source.is_dir():
        raise ConfigError(f"the {pattern} app is missing from this installation of durable")
    folder.mkdir(parents=True, exist_ok=True)
    written = _copy(source, folder)
    for name, text in (("pytest.ini", _PYTEST_INI), ("README.md", _README.format(name=folder.name, pattern=pattern)),
                       (".gitignore", ".durable/\n__pycache__/\n")):
        (folder / name).write_text(text)
        written.append(folder / name)
    return written
