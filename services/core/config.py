"""``durable.toml``: bindings (name -> class) and class migrations, the ``wrangler.toml`` equivalent.

```toml
routes = "app:fetch"            # the routing function (a Worker's fetch), optional

[bindings]
COUNTERS = "durable.objects.patterns.counter:Counter"

[[migrations]]
tag = "v1"
new_classes = ["Counter"]
```

A class's namespace *identity* (what keys its ids and its stored data) is the name it had in
``new_classes``; ``renamed_classes`` carries the identity to the new name, so ids and data
survive a rename, as in Cloudflare. Any problem stops start-up with a ConfigError naming the
file, the key and the problem.

The application lives next to its ``durable.toml``, outside the library: the file's folder is
put on ``sys.path`` before any of its classes or its routes are imported, as ``wrangler`` bundles
a project from its own folder.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .subscription_config import (
    RawStream,
    RawSubscription,
    StreamDecl,
    Subscription,
    check_streams,
    check_subscriptions,
)
from .wire import is_token


class _Rename(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from")
    to: str


class _Migration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str
    new_classes: list[str] = []
    renamed_classes: list[_Rename] = []
    deleted_classes: list[str] = []


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    routes: str | None = None
    bindings: dict[str, str] = {}
    migrations: list[_Migration] = []
    subscriptions: list[RawSubscription] = []
    streams: list[RawStream] = []


@dataclass(frozen=True)
class Binding:
    name: str  #: attribute on ``env``, e.g. COUNTERS
    class_path: str  #: import path, ``module:Class``
    class_name: str  #: the namespace token in subjects
    identity: str  #: keys the ids; stable across renames


@dataclass(frozen=True)
class Migration:
    tag: str
    new_classes: tuple[str, ...]
    renamed_classes: tuple[tuple[str, str], ...]
    deleted_classes: tuple[str, ...]


@dataclass(frozen=True)
class AppConfig:
    path: Path
    bindings: tuple[Binding, ...]
    migrations: tuple[Migration, ...]
    #: every live class name -> identity after all migrations
    classes: dict[str, str]
    #: the routing function, ``module:function`` (``routes`` in the file), if the app has one
    routes: str | None = None
    #: JetStream streams delivered into objects (``[[subscriptions]]``, subscription_config.py)
    subscriptions: tuple[Subscription, ...] = ()
    #: JetStream streams the worker creates when missing (``[[streams]]``)
    streams: tuple[StreamDecl, ...] = ()

    @property
    def app_dir(self) -> Path:
        """The application's folder: the one holding its ``durable.toml``."""
        return self.path.resolve().parent

    def make_importable(self) -> None:
        """Put the application's folder first on ``sys.path`` (once), so ``app:Counter`` imports."""
        folder = str(self.app_dir)
        if folder not in sys.path:
            sys.path.insert(0, folder)

    def binding(self, name: str) -> Binding:
        for b in self.bindings:
            if b.name == name:
                return b
        raise KeyError(name)

    def load_classes(self) -> dict[str, type]:
        """Import every bound class (worker start-up); a failure names the binding and the problem."""
        self.make_importable()
        loaded: dict[str, type] = {}
        for b in self.bindings:
            loaded[b.class_name] = import_class(b.class_path, where=f"{self.path}: bindings.{b.name}")
        return loaded


def import_class(path: str, where: str) -> type:
    module_name, _, attr = path.partition(":")
    if not attr:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        raise ConfigError(f"{where}: class {path!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{where}: {path!r} is not a class")
    return cls


def import_function(path: str, where: str) -> Callable[..., Any]:
    """A function named ``module:function`` (the routing code); a failure names the problem."""
    module_name, _, attr = path.partition(":")
    try:
        fn: object = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        raise ConfigError(f"{where}: {path!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {path!r} is not a function")
    return fn


def _class_name(path: str) -> str:
    return path.partition(":")[2] or path.rpartition(".")[2]


def _resolve_classes(path: Path, migrations: list[_Migration]) -> dict[str, str]:
    classes: dict[str, str] = {}
    seen_tags: set[str] = set()
    for i, m in enumerate(migrations):
        where = f"{path}: migrations[{i}] (tag {m.tag!r})"
        if m.tag in seen_tags:
            raise ConfigError(f"{where}: duplicate tag")
        seen_tags.add(m.tag)
        for name in m.new_classes:
            if not is_token(name):
                raise ConfigError(f"{where}: new_classes: {name!r} is not a valid class name")
            if name in classes:
                raise ConfigError(f"{where}: new_classes: class {name!r} already exists")
            classes[name] = name
        for r in m.renamed_classes:
            if r.from_ not in classes:
                raise ConfigError(f"{where}: renamed_classes: no class {r.from_!r} to rename")
            if r.to in classes or not is_token(r.to):
                raise ConfigError(f"{where}: renamed_classes: cannot rename to {r.to!r}")
            classes[r.to] = classes.pop(r.from_)
        for name in m.deleted_classes:
            if name not in classes:
                raise ConfigError(f"{where}: deleted_classes: no class {name!r} to delete")
            del classes[name]
    return classes


def _format_validation(path: Path, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{path}: {loc}: {msg}")
    return "\n".join(problems)


def parse_config(path: Path, data: dict[str, Any]) -> AppConfig:
    try:
        raw = _File.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from None
    classes = _resolve_classes(path, raw.migrations)
    bindings = []
    for name, class_path in raw.bindings.items():
        if not name.isidentifier():
            raise ConfigError(f"{path}: bindings.{name}: binding names must be identifiers")
        cname = _class_name(class_path)
        if cname not in classes:
            raise ConfigError(
                f"{path}: bindings.{name}: class {cname!r} is not created by any migration "
                f"(add it to new_classes in a [[migrations]] entry)"
            )
        bindings.append(Binding(name, class_path, cname, classes[cname]))
    migrations = tuple(
        Migration(m.tag, tuple(m.new_classes), tuple((r.from_, r.to) for r in m.renamed_classes),
                  tuple(m.deleted_classes))
        for m in raw.migrations
    )
    if raw.routes is not None and (":" not in raw.routes or not all(raw.routes.partition(":")[::2])):
        raise ConfigError(f"{path}: routes: {raw.routes!r} must name a function as 'module:function'")
    subscriptions = check_subscriptions(path, raw.subscriptions, {b.name: b.class_name for b in bindings})
    streams = check_streams(path, raw.streams)
    return AppConfig(path, tuple(bindings), migrations, classes, raw.routes, subscriptions, streams)


def load_config(path: Path) -> AppConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no {path} in {Path.cwd()}: an app is a folder with a durable.toml (see the README), "
                          "or start from a pattern's app: `durable new counter myapp && cd myapp`") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    return parse_config(path, data)
