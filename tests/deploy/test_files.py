"""The deployment files checked against what the runtime needs: no container engine or cluster
runs here, so the compose file, the manifests, the NATS configs and the Dockerfile are parsed
and their settings compared with the runtime's own (setting names, the partition mapping, the
drain, the health endpoints)."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from durable.core.embedded import nats_server_binary
from durable.core.settings import DEV_ID_SECRET, Settings

from tests.deploy import natsconf
from tests.deploy.files import (
    DEPLOY,
    K8S,
    NOT_MANIFESTS,
    ROOT,
    dockerfile_stages,
    env_file_values,
    env_files,
    load_compose,
    manifest,
    manifests,
    mapping_for,
    nats_conf,
    nats_hosts,
    nats_services,
    seconds,
    service_env,
    services_running,
    setting_names,
    worker_drain,
)

SETTINGS_DEFAULTS = Settings.model_fields


def default(name: str) -> Any:
    """A setting's default (of a setting branch ops adds: what it will be, 0 for the delay)."""
    field = SETTINGS_DEFAULTS.get(name)
    return field.default if field is not None else {"shutdown_delay": 0.0}.get(name)


def deploy_files() -> list[Any]:
    return [p for p in sorted(DEPLOY.rglob("*")) if p.is_file()]


# ----- names ---------------------------------------------------------------------------------

def test_every_durable_name_in_the_deploy_files_is_a_setting() -> None:
    names = setting_names()
    used: dict[str, set[str]] = {}
    for path in deploy_files():
        for name in re.findall(r"\bDURABLE_[A-Z0-9_]+\b", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert {"DURABLE_NATS_URL", "DURABLE_DATABASE_URL", "DURABLE_ID_SECRET"} <= set(used)
    unknown = {n: sorted(files) for n, files in used.items() if n not in names}
    assert not unknown, f"not settings of durable.core.settings.Settings: {unknown}"


def test_the_name_check_catches_a_misspelt_name() -> None:
    assert "DURABLE_NATS_URL" in setting_names()
    assert "DURABLE_NATS_URLS" not in setting_names() and "DURABLE_HEALTHPORT" not in setting_names()


def test_every_setting_value_is_one_the_settings_accept() -> None:
    """Every service's environment (and the ConfigMap plus Secret) builds valid Settings."""
    compose = load_compose()
    envs = [service_env(s) for kind in ("worker", "router") for s in services_running(compose, kind).values()]
    data = manifest("ConfigMap", "durable")["data"] | manifest("Secret", "durable")["stringData"]
    for env in [*envs, data]:
        values = {k.removeprefix("DURABLE_").lower(): v for k, v in env.items()
                  if k.startswith("DURABLE_") and k.removeprefix("DURABLE_").lower() in SETTINGS_DEFAULTS}
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        assert settings.id_secret != DEV_ID_SECRET
        assert len(settings.nats_servers) == 3


# ----- NATS ----------------------------------------------------------------------------------

def test_compose_runs_three_nats_nodes_each_with_its_config() -> None:
    nodes = nats_services(load_compose())
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    for path in nodes.values():
        assert path.parent == DEPLOY / "nats" and path.is_file()


@pytest.mark.parametrize("node", ["nats-1", "nats-2", "nats-3"])
def test_a_nats_config_has_the_settings_the_runtime_needs(node: str) -> None:
    compose = load_compose()
    nodes = nats_services(compose)
    conf = nats_conf(nodes[node])
    assert conf["server_name"] == node
    assert conf["ping_interval"] == "2s" and conf["ping_max"] == 2
    assert conf["max_payload"] == "1MB"
    assert isinstance(conf["jetstream"], dict) and conf["jetstream"]["store_dir"].startswith("/data")
    partitions = {int(service_env(s)["DURABLE_PARTITIONS"])
                  for kind in ("worker", "router") for s in services_running(compose, kind).values()}
    assert len(partitions) == 1, "workers and routers must agree on DURABLE_PARTITIONS"
    assert conf["mappings"] == mapping_for(partitions.pop())
    # a cluster block with routes to the two other nodes, on their cluster ports
    cluster = conf["cluster"]
    assert cluster["name"] == "durable"
    routes = {(urlsplit(r).hostname, urlsplit(r).port) for r in cluster["routes"]}
    others = {(name, int(nats_conf(path)["cluster"]["listen"].rsplit(":", 1)[1]))
              for name, path in nodes.items() if name != node}
    assert routes == others
    assert all(urlsplit(r).scheme == "nats-route" for r in cluster["routes"])


def test_nats_server_accepts_each_config() -> None:
    compose = load_compose()
    for name, path in nats_services(compose).items():
        env = {**os.environ, **service_env(compose["services"][name])}
        result = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True,
                                timeout=30, env=env)
        assert result.returncode == 0, result.stderr
        # and without the users' passwords it refuses to start (no user left without one)
        bare = {k: v for k, v in env.items() if not k.startswith("NATS_")}
        result = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True,
                                timeout=30, env=bare)
        assert result.returncode != 0 and "NATS_WORKER_PASSWORD" in result.stderr


def test_compose_locks_nats_down_with_the_shipped_users() -> None:
    """Each node mounts deploy/nats/auth.conf beside its config, which includes it; each worker
    and router connects as its user with that user's password and reply prefix."""
    compose = load_compose()
    for name, path in nats_services(compose).items():
        service = compose["services"][name]
        assert "./nats/auth.conf:/etc/nats/auth.conf:ro" in service["volumes"]
        assert nats_conf(path)["include"] == "auth.conf"
    server_env = service_env(compose["services"]["nats-1"])
    for kind in ("worker", "router"):
        for name, service in services_running(compose, kind).items():
            env = service_env(service)
            assert env["DURABLE_NATS_USER"] == kind, name
            assert env["DURABLE_NATS_INBOX_PREFIX"] == f"_INBOX.{kind}", name
            assert env["DURABLE_NATS_PASSWORD"] == server_env[f"NATS_{kind.upper()}_PASSWORD"], name
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_wrong_mapping_is_told_apart() -> None:
    """The mapping check compares the partition count, not just the shape."""
    assert mapping_for(256) != mapping_for(128)
    conf = nats_conf(DEPLOY / "nats" / "nats-1.conf")
    conf["mappings"] = {k: v.replace("256", "128") for k, v in conf["mappings"].items()}
    assert natsconf.parse(natsconf.dump(conf))["mappings"] == mapping_for(128)


def test_durable_nats_url_lists_every_node_on_its_client_port() -> None:
    compose = load_compose()
    nodes = nats_services(compose)
    expected = sorted((name, int(nats_conf(path)["listen"].rsplit(":", 1)[1])) for name, path in nodes.items())
    for kind in ("worker", "router"):
        for name, service in services_running(compose, kind).items():
            assert sorted(nats_hosts(service_env(service)["DURABLE_NATS_URL"])) == expected, name


def test_the_helm_values_carry_the_same_server_settings() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())["config"]
    assert values["cluster"] == {"enabled": True, "replicas": 3}
    assert values["jetstream"]["enabled"] is True
    merge = values["merge"]
    assert merge["ping_interval"] == "2s" and merge["ping_max"] == 2
    assert merge["max_payload"] == "<< 1MB >>"
    config = manifest("ConfigMap", "durable")["data"]
    assert merge["mappings"] == mapping_for(int(config["DURABLE_PARTITIONS"]))
    hosts = nats_hosts(config["DURABLE_NATS_URL"])
    assert hosts == [(f"nats-{i}.nats-headless", 4222) for i in range(values["cluster"]["replicas"])]


# ----- compose -------------------------------------------------------------------------------

def test_compose_runs_postgres_three_workers_and_two_routers() -> None:
    compose = load_compose()
    workers, routers = services_running(compose, "worker"), services_running(compose, "router")
    assert len(workers) == 3 and len(routers) == 2
    postgres = compose["services"]["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    for name, service in {**workers, **routers}.items():
        env = service_env(service)
        assert urlsplit(env["DURABLE_DATABASE_URL"]).hostname == "postgres", name
        assert env["DURABLE_CONFIG_FILE"] == "/app/durable.toml"
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_secrets_come_from_the_env_file_not_the_compose_file() -> None:
    compose = load_compose()
    text = (DEPLOY / "compose.yaml").read_text()
    example = env_file_values(DEPLOY / "durable.env")
    assert {"DURABLE_ID_SECRET", "DURABLE_DATABASE_URL", "POSTGRES_PASSWORD"} <= set(example)
    assert "DURABLE_ID_SECRET:" not in text and "DURABLE_DATABASE_URL:" not in text
    assert "postgresql://" not in text and example["POSTGRES_PASSWORD"] not in text
    for name in ("postgres", *services_running(compose, "worker"), *services_running(compose, "router")):
        assert env_files(compose["services"][name]) == [DEPLOY / "durable.env"], name
    assert "deploy/durable.env" in (ROOT / ".gitignore").read_text().splitlines()
    # the database URL's password is the one Postgres is given
    assert urlsplit(example["DURABLE_DATABASE_URL"]).password == example["POSTGRES_PASSWORD"]


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:\d+/\w+", test)
    assert m, f"no URL in the healthcheck {test!r}"
    return m.group()


def test_workers_serve_their_health_port_and_are_checked_on_readyz() -> None:
    for name, service in services_running(load_compose(), "worker").items():
        port = int(service_env(service)["DURABLE_HEALTH_PORT"])
        assert port > 0, f"{name}: the health port is off"
        assert service_env(service).get("DURABLE_HEALTH_HOST", "0.0.0.0") == "0.0.0.0"
        assert _healthcheck_url(service) == f"http://127.0.0.1:{port}/readyz"


def test_routers_listen_on_every_interface_and_are_checked_on_readyz() -> None:
    published = set()
    for name, service in services_running(load_compose(), "router").items():
        env = service_env(service)
        assert env["DURABLE_HTTP_HOST"] == "0.0.0.0", name
        port = int(env.get("DURABLE_HTTP_PORT", default("http_port")))
        assert _healthcheck_url(service) == f"http://127.0.0.1:{port}/readyz"
        (mapping,) = service["ports"]
        host_ip, host_port, container_port = mapping.split(":")
        assert int(container_port) == port and host_ip == "127.0.0.1"
        published.add(int(host_port))
    assert len(published) == 2


def test_start_order_waits_on_health() -> None:
    compose = load_compose()
    for name in compose["services"]:
        assert "healthcheck" in compose["services"][name], f"{name} has no healthcheck"
    for name, service in services_running(compose, "worker").items():
        assert service["depends_on"] == {n: {"condition": "service_healthy"}
                                         for n in ("nats-1", "nats-2", "nats-3", "postgres")}, name
    for name, service in services_running(compose, "router").items():
        deps = service["depends_on"]
        assert all(d == {"condition": "service_healthy"} for d in deps.values()), name
        assert {"nats-1", "nats-2", "nats-3"} <= set(deps), name


def test_stop_grace_period_outlasts_the_drain() -> None:
    for kind in ("worker", "router"):
        for name, service in services_running(load_compose(), kind).items():
            delay = float(service_env(service).get("DURABLE_SHUTDOWN_DELAY", default("shutdown_delay")))
            assert seconds(service["stop_grace_period"]) > worker_drain(delay), name


def test_the_drain_bound_follows_the_worker() -> None:
    """A longer shutdown delay needs a longer grace period: the check is not a constant."""
    assert worker_drain(30.0) > seconds(load_compose()["services"]["worker-1"]["stop_grace_period"])
    assert worker_drain(0.0) >= 10.0
    assert seconds("1m30s") == 90.0 and seconds("500ms") == 0.5


# ----- Kubernetes ----------------------------------------------------------------------------

def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMap and Secret, then its own ``env``."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(manifest("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(manifest("Secret", source["secretRef"]["name"])["stringData"])
    for e in container.get("env", []):
        if "valueFrom" in e:  # a key of a Secret
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = manifest("Secret", ref["name"])["stringData"][ref["key"]]
        else:
            env[e["name"]] = e["value"]
    return env


def _probe_port(container: dict[str, Any], probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
    return get["path"], int(port)


def test_every_manifest_is_a_known_kind_with_a_name() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in manifests())
    assert kinds == sorted([("ConfigMap", "durable"), ("Secret", "durable"), ("Secret", "durable-nats"),
                            ("Deployment", "durable-worker"),
                            ("Deployment", "durable-router"), ("Service", "durable-router"),
                            ("PodDisruptionBudget", "durable-worker"), ("PodDisruptionBudget", "durable-router")])


def test_the_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # every manifest but the Secret's placeholders, which must never be applied as they are
    expected = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in (*NOT_MANIFESTS, "secret.yaml"))
    assert sorted(kustomization["resources"]) == expected


def test_the_worker_deployment_probes_its_health_port() -> None:
    deployment = manifest("Deployment", "durable-worker")
    container = _container(deployment)
    assert container["args"] == ["worker"]
    env = _env(container)
    port = int(env["DURABLE_HEALTH_PORT"])
    assert _probe_port(container, "livenessProbe") == ("/livez", port)
    assert _probe_port(container, "readinessProbe") == ("/readyz", port)
    assert {"DURABLE_NATS_URL", "DURABLE_DATABASE_URL", "DURABLE_ID_SECRET"} <= set(env)
    assert deployment["spec"]["replicas"] == 3


def test_the_worker_grace_period_outlasts_the_drain() -> None:
    deployment = manifest("Deployment", "durable-worker")
    delay = float(_env(_container(deployment)).get("DURABLE_SHUTDOWN_DELAY", default("shutdown_delay")))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > worker_drain(delay)


def test_the_router_deployment_and_service() -> None:
    deployment = manifest("Deployment", "durable-router")
    container = _container(deployment)
    assert container["args"] == ["router"]
    env = _env(container)
    assert env["DURABLE_HTTP_HOST"] == "0.0.0.0"
    port = int(env.get("DURABLE_HTTP_PORT", default("http_port")))
    assert _probe_port(container, "livenessProbe") == ("/livez", port)
    assert _probe_port(container, "readinessProbe") == ("/readyz", port)
    delay = float(env.get("DURABLE_SHUTDOWN_DELAY", default("shutdown_delay")))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > delay
    service = manifest("Service", "durable-router")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in [p["name"] for p in container["ports"]]


def test_pods_run_as_the_images_non_root_user() -> None:
    uid = _dockerfile_user()
    for name in ("durable-worker", "durable-router"):
        pod = manifest("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert _container(manifest("Deployment", name))["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_disruption_budget_keeps_all_but_one_worker() -> None:
    pdb = manifest("PodDisruptionBudget", "durable-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = manifest("Deployment", "durable-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_secret_holds_placeholders_only() -> None:
    data = manifest("Secret", "durable")["stringData"]
    assert set(data) == {"DURABLE_ID_SECRET", "DURABLE_DATABASE_URL"}
    assert all("replace-with" in v for v in data.values())
    assert not set(data) & set(manifest("ConfigMap", "durable")["data"])


# ----- the image -----------------------------------------------------------------------------

def _dockerfile_user() -> int:
    users = [line.split()[1] for line in dockerfile_stages()[-1] if line.split()[0].upper() == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric USER, so runAsNonRoot can check it"
    return int(uid)


def test_the_image_runs_as_non_root() -> None:
    assert _dockerfile_user() != 0


def test_the_image_installs_the_wheel_built_in_its_own_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert build[0].split()[-1] == "build"
    assert any(line.startswith("RUN pip wheel") and "--wheel-dir /wheels" in line for line in build)
    assert runtime[0].split()[1] == "python:3.11-slim"
    (install,) = [line for line in runtime if "pip install" in line]
    assert "from=build" in install and "source=/wheels" in install
    assert "--no-index --find-links /wheels durable" in install
    # the runtime stage gets no sources: only the app (durable.toml, examples/) is copied in
    copied = [line.split()[-2] for line in runtime if line.startswith("COPY")]
    assert copied == ["durable.toml", "examples/"]
    assert 'ENTRYPOINT ["durable"]' in runtime and 'CMD ["worker"]' in runtime


def test_the_build_context_keeps_what_the_image_copies() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "deploy/durable.env"} <= set(ignored)
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY") and "--from" not in line:
                for source in line.split()[1:-1]:
                    if source.startswith("--"):
                        continue
                    assert (ROOT / source).exists(), source
                    assert source.rstrip("/") not in ignored and source.split("/")[0] not in ignored, source


def _resolved_users(conf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``authorization`` users of a parsed nats config, their ``$PERMISSIONS`` variables
    resolved: user -> (password reference, permissions)."""
    users = {}
    for user in conf["authorization"]["users"]:
        permissions = user["permissions"]
        if isinstance(permissions, str) and permissions.startswith("$"):
            permissions = conf[permissions[1:]]
        users[user["user"]] = {"password": str(user["password"]).strip("<> "), "permissions": permissions}
    return users


def test_the_helm_values_lock_nats_down_as_auth_conf_does() -> None:
    """nats-values.yaml carries the users and permissions of deploy/nats/auth.conf, unchanged,
    their passwords from the durable-nats Secret; the worker and router Deployments connect as
    their users with their own reply prefix and password."""
    shipped = _resolved_users(nats_conf(DEPLOY / "nats" / "auth.conf"))
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    helm = _resolved_users(values["config"]["merge"])
    assert helm == shipped and sorted(shipped) == ["app", "operator", "router", "worker"]
    secret = manifest("Secret", "durable-nats")["stringData"]
    for user, entry in shipped.items():
        name = entry["password"].removeprefix("$")
        assert values["container"]["env"][name]["valueFrom"]["secretKeyRef"] == {"name": "durable-nats", "key": name}
        assert name in secret, user
    for kind in ("worker", "router"):
        env = _env(_container(manifest("Deployment", f"durable-{kind}")))
        assert env["DURABLE_NATS_USER"] == kind and env["DURABLE_NATS_INBOX_PREFIX"] == f"_INBOX.{kind}"
        assert env["DURABLE_NATS_PASSWORD"] == secret[f"NATS_{kind.upper()}_PASSWORD"]

