"""The deployment files under deploy/, read as the tests need them: the compose file with each
service's environment as a container would see it, the Kubernetes manifests, the NATS configs,
and the names and limits of the runtime they are checked against."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from durable.core.settings import Settings
from durable.objects import Worker
from durable.objects.handover import HANDOVER_LINGER

from tests.deploy import natsconf
from tests.helpers.settings import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
NOT_MANIFESTS = ("nats-values.yaml", "kustomization.yaml")

#: What a worker's stop does after the quiesce (whose length is Worker.stop's ``grace``): the
#: linger of withdrawn subscriptions, then up to 2 s for the hand-over's and 2 s for the
#: partitions' last tasks (worker.py), rounded up to cover the flusher's and connections' close.
DRAIN_TAIL = HANDOVER_LINGER + 2.0 + 2.0 + 1.0


def setting_names() -> set[str]:
    """Every ``DURABLE_*`` name a deployment may set (the fields of :class:`Settings`)."""
    return {f"DURABLE_{name.upper()}" for name in Settings.model_fields}


def worker_drain(shutdown_delay: float) -> float:
    """The longest a `durable worker` takes from SIGTERM to exit: the shutdown delay (readiness
    false first), the quiesce (Worker.stop's grace for events in flight), then :data:`DRAIN_TAIL`."""
    grace = inspect.signature(Worker.stop).parameters["grace"].default
    assert isinstance(grace, (int, float))
    return shutdown_delay + grace + DRAIN_TAIL


def seconds(duration: str | int | float) -> float:
    """A compose duration (``40s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def env_file_values(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of an env file; a file not there yet (``durable.env`` is made from
    ``durable.env.example`` by whoever deploys) is read from its ``.example``."""
    if not path.exists():
        path = path.with_name(path.name + ".example")
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            values[key.strip()] = value.strip()
    return values


def env_files(service: dict[str, Any]) -> list[Path]:
    files = service.get("env_file") or []
    if isinstance(files, (str, dict)):
        files = [files]
    return [DEPLOY / (f["path"] if isinstance(f, dict) else f) for f in files]


#: ``${NAME}``, ``${NAME:?message}`` or ``${NAME:-default}`` in the compose file
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([?-])([^}]*))?\}")


def compose_variables() -> dict[str, str]:
    """What compose fills the compose file's ``${...}`` from: deploy/.env (its ``.example`` here)."""
    return env_file_values(DEPLOY / ".env")


def interpolate(value: str) -> str:
    """A compose value with its ``${...}`` filled in as compose does; a required variable that
    deploy/.env(.example) lacks fails the test."""
    variables = compose_variables()

    def fill(m: re.Match[str]) -> str:
        name, kind, rest = m.group(1), m.group(2), m.group(3)
        if name in variables:
            return variables[name]
        assert kind == "-", f"${{{name}}} is not set in deploy/.env.example ({rest or 'required'})"
        return rest or ""

    return _INTERPOLATION.sub(fill, value)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """The environment compose gives a service's container: its env files, then ``environment``
    (with the compose file's ``${...}`` filled in from deploy/.env)."""
    env: dict[str, str] = {}
    for path in env_files(service):
        env.update(env_file_values(path))
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env.update({k: interpolate(str(v)) for k, v in environment.items()})
    return env


def services_running(compose: dict[str, Any], command: str) -> dict[str, dict[str, Any]]:
    """The durable services whose command is ``durable <command>``, by name, in file order."""
    return {name: s for name, s in compose["services"].items() if s.get("command") == [command]}


def nats_services(compose: dict[str, Any]) -> dict[str, Path]:
    """The nats-server services and the config file each mounts as /etc/nats/nats.conf."""
    out: dict[str, Path] = {}
    for name, s in compose["services"].items():
        if str(s.get("image", "")).startswith("nats:"):
            for volume in s.get("volumes", []):
                source, _, target = volume.partition(":")
                if target.split(":")[0] == "/etc/nats/nats.conf":
                    out[name] = (DEPLOY / source).resolve()
    return out


def nats_conf(path: Path) -> dict[str, Any]:
    return natsconf.parse(path.read_text())


def mapping_for(partitions: int) -> dict[str, Any]:
    """The ``mappings`` block the runtime requires (``server_mapping``), parsed."""
    from durable.core.wire import server_mapping

    mappings = natsconf.parse("mappings = {" + server_mapping(partitions) + "}")["mappings"]
    assert isinstance(mappings, dict)
    return mappings


def nats_hosts(url_list: str) -> list[tuple[str, int]]:
    """(host, port) of each server of a comma-separated ``DURABLE_NATS_URL``."""
    out = []
    for url in url_list.split(","):
        parts = urlsplit(url.strip())
        assert parts.scheme == "nats" and parts.hostname, f"not a nats:// URL: {url!r}"
        out.append((parts.hostname, parts.port or 4222))
    return out


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s (nats-values.yaml is Helm values, not an object;
    kustomization.yaml lists the files)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name not in NOT_MANIFESTS:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found in deploy/k8s"
    return found[0]


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments left out), by stage."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[list[str]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        if line.split()[0].upper() == "FROM":
            stages.append([])
        assert stages, f"an instruction before FROM: {line!r}"
        stages[-1].append(line.strip())
    return stages
