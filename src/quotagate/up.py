"""`quotagate up`: the whole stack on one machine for a first run, stopped together with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from quotagate.config import (
    DEFAULT_ENVOY_TOKEN,
    DEFAULT_LINK_SECRET,
    DEFAULT_USAGE_TOKEN,
    Settings,
    load_settings,
)
from quotagate.demo_upstream import start_demo_upstream
from quotagate.envoyconf import EnvoyOptions, write_envoy_config
from quotagate.procs import (
    ManagedProcess,
    free_port,
    litellm_binary,
    start_embedded_postgres,
    start_envoy,
    start_litellm,
    start_redis,
    wait_envoy_ready,
    wait_for_port,
    wait_litellm_ready,
)
from quotagate.secrets_file import state_secret
from quotagate.server import Running, start

DEMO_ADMIN_TOKEN = "demo-admin-token"
LINK_SECRET_FILE = "link-secret"  # in the state dir, made by the first run
ENVOY_TOKEN_FILE = "envoy-token"  # likewise: what Envoy sends on its gRPC calls
USAGE_TOKEN_FILE = "usage-token"  # and what LiteLLM's usage callback sends with ReportUsage
log = logging.getLogger("quotagate.up")


@dataclass(frozen=True)
class UpOptions:
    config: Path | None
    database_url: str | None
    redis_url: str | None
    upstream: str | None
    port: int
    state_dir: Path
    # A real LiteLLM proxy (mock models, quotagate's usage callback) as the upstream instead of the demo server.
    litellm: bool = False


LITELLM_MISSING = "quotagate up --litellm: LiteLLM is not installed: install quotagate[litellm]"


def demo_config_path(state_dir: Path) -> Path:
    path = state_dir / "demo.yaml"
    path.write_text(resources.files("quotagate").joinpath("templates", "demo.yaml").read_text("utf-8"))
    return path


def litellm_config_path(state_dir: Path) -> Path:
    path = state_dir / "litellm-demo.yaml"
    path.write_text(resources.files("quotagate").joinpath("templates", "litellm-demo.yaml").read_text("utf-8"))
    return path


def with_own_link_secret(settings: Settings, state_dir: Path) -> Settings:
    """The public default would let anyone forge balance links: unless one was given, a secret of the state dir."""
    if settings.link_secret != DEFAULT_LINK_SECRET:
        return settings
    return replace(settings, link_secret=state_secret(state_dir, LINK_SECRET_FILE))


def with_own_tokens(settings: Settings, state_dir: Path) -> Settings:
    """The caller tokens (Envoy's, the usage reporter's) of the state dir, unless the config or the environment
    gives them: the public defaults would let anything that reaches the ports call in."""
    if settings.envoy_token == DEFAULT_ENVOY_TOKEN:
        settings = replace(settings, envoy_token=state_secret(state_dir, ENVOY_TOKEN_FILE))
    if settings.usage_token == DEFAULT_USAGE_TOKEN:
        settings = replace(settings, usage_token=state_secret(state_dir, USAGE_TOKEN_FILE))
    return settings


def litellm_installed() -> bool:
    """Whether the litellm[proxy] package (the `litellm` console script and its module) is there."""
    if importlib.util.find_spec("litellm") is None:
        return False
    try:
        litellm_binary()
    except FileNotFoundError:
        return False
    return True


async def run_up(opts: UpOptions) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if opts.litellm and not litellm_installed():
        print(LITELLM_MISSING, file=sys.stderr)
        return 1
    # LiteLLM's master key: Envoy sends it upstream in place of the client's key (quotagate's upstream.api_key).
    litellm_key = "sk-quotagate-" + secrets.token_hex(24) if opts.litellm else None
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    cleanups: list[tuple[str, object]] = []
    lines: list[str] = []
    try:
        database_url = opts.database_url
        if database_url is None:
            database_url, stop_pg = start_embedded_postgres(state / "postgres")
            cleanups.append(("postgres", stop_pg))
            lines.append("PostgreSQL  embedded, data in " + str(state / "postgres"))
        else:
            lines.append(f"PostgreSQL  {database_url}")
        redis_url = opts.redis_url
        if redis_url is None:
            redis_port = free_port()
            redis_proc = start_redis(state / "redis", redis_port)
            cleanups.append(("redis", redis_proc))
            await wait_for_port("127.0.0.1", redis_port, process=redis_proc)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        lines.append(f"Redis       {redis_url}")

        config_path = opts.config or demo_config_path(state)
        env: Mapping[str, str] = {
            **os.environ,
            "QUOTAGATE_DATABASE_URL": database_url,
            "QUOTAGATE_REDIS_URL": redis_url,
            "QUOTAGATE_GRPC_LISTEN": f"127.0.0.1:{_port_or_free(50051)}",
            "QUOTAGATE_DECISION_LISTEN": f"127.0.0.1:{_port_or_free(50053)}",
            "QUOTAGATE_HTTP_LISTEN": f"127.0.0.1:{_port_or_free(8080)}",
            "QUOTAGATE_ADMIN_TOKEN": os.environ.get("QUOTAGATE_ADMIN_TOKEN", DEMO_ADMIN_TOKEN),
            "QUOTAGATE_PUBLIC_URL": os.environ.get("QUOTAGATE_PUBLIC_URL", f"http://127.0.0.1:{opts.port}"),
            **({"QUOTAGATE_UPSTREAM_API_KEY": litellm_key} if litellm_key is not None else {}),
        }
        settings = with_own_tokens(with_own_link_secret(load_settings(config_path, env), state), state)
        running = await start(settings)
        cleanups.append(("quotagate", running))
        lines.append(
            f"quotagate   gRPC 127.0.0.1:{running.grpc_port}  decisions 127.0.0.1:{running.decision_port}"
            f"  HTTP http://127.0.0.1:{running.http_port}"
        )
        lines.append(f"            config {config_path}")

        if litellm_key is not None:
            upstream_host, upstream_tls = "127.0.0.1", False
            upstream_port = _port_or_free(4000)
            litellm_config = litellm_config_path(state)
            usage_target = f"127.0.0.1:{running.grpc_port}"
            litellm = start_litellm(
                litellm_config,
                upstream_port,
                state / "litellm.log",
                env={
                    **os.environ,
                    "LITELLM_MASTER_KEY": litellm_key,
                    "QUOTAGATE_USAGE_TARGET": usage_target,
                    "QUOTAGATE_USAGE_TOKEN": settings.usage_token,
                },
            )
            cleanups.append(("litellm", litellm))
            await wait_litellm_ready(upstream_port, timeout=120, process=litellm)
            lines += [
                f"upstream    LiteLLM proxy http://127.0.0.1:{upstream_port}  (mock models demo-small, demo-large)",
                f"            config {litellm_config}",
                f"            log {state / 'litellm.log'}",
                f"            master key {litellm_key}",
                "            (Envoy sends it to LiteLLM in place of the client's key)",
                f"            usage callback QUOTAGATE_USAGE_TARGET={usage_target} (quotagate.litellm_callback)",
                f"            with QUOTAGATE_USAGE_TOKEN from {state / USAGE_TOKEN_FILE}",
            ]
        elif opts.upstream:
            parts = urlsplit(opts.upstream)
            upstream_host = parts.hostname or "127.0.0.1"
            upstream_tls = parts.scheme == "https"
            upstream_port = parts.port or (443 if upstream_tls else 80)
            lines.append(f"upstream    {opts.upstream}")
        else:
            demo_runner, upstream_port = await start_demo_upstream()
            cleanups.append(("demo upstream", demo_runner))
            upstream_host, upstream_tls = "127.0.0.1", False
            lines.append(f"upstream    demo OpenAI-compatible server http://127.0.0.1:{upstream_port}")

        admin_port = free_port()
        envoy_config = write_envoy_config(
            EnvoyOptions(
                upstream_host=upstream_host,
                upstream_port=upstream_port,
                upstream_tls=upstream_tls,
                listen_port=opts.port,
                admin_port=admin_port,
                authz_port=running.grpc_port,
                decision_port=running.decision_port,
                http_port=running.http_port,
                envoy_token=settings.envoy_token,
            ),
            state / "envoy.yaml",
        )
        envoy_config.chmod(0o600)  # it holds Envoy's token
        envoy = start_envoy(envoy_config, state / "envoy.log")
        cleanups.append(("envoy", envoy))
        await wait_envoy_ready(admin_port, process=envoy)
        lines.append(f"Envoy       http://127.0.0.1:{opts.port}  (admin http://127.0.0.1:{admin_port})")

        _print_banner(lines, opts.port, running, env["QUOTAGATE_ADMIN_TOKEN"], opts.config is None)
        await _wait_for_interrupt()
        print("\nstopping ...")
        return 0
    finally:
        for name, item in reversed(cleanups):
            with contextlib.suppress(Exception):
                await _stop(item)
            log.info("%s stopped", name)


def _port_or_free(preferred: int) -> int:
    """The usual port when it is free (so the printed lines are the familiar ones), else any free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


async def _stop(item: object) -> None:
    if isinstance(item, ManagedProcess):
        item.stop()
    elif isinstance(item, Running):
        await item.stop()
    elif hasattr(item, "cleanup"):
        await item.cleanup()
    elif callable(item):
        item()


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _print_banner(lines: list[str], port: int, running: Running, admin_token: str, demo: bool) -> None:
    print("\nquotagate is up:\n")
    for line in lines:
        print("  " + line)
    print(f"\n  admin token: {admin_token}")
    if demo:
        print("  client key:  demo-key (trusted: asserts users with x-user-id)")
        print("  allowance:   300 tokens a month on the demo plan; warn at 80%, critical at 95%\n")
        print("Try (repeat it: the headers go normal -> warn -> critical, then 429):\n")
        print(
            f"  curl -i http://127.0.0.1:{port}/v1/chat/completions -H 'authorization: Bearer demo-key' \\\n"
            "    -H 'x-user-id: alice@example.com' -H 'content-type: application/json' \\\n"
            '    -d \'{"model":"demo-small","max_tokens":50,"messages":[{"role":"user","content":"hello"}]}\'\n'
        )
        print("Look at the account and add credits (in another shell; quotagate and grpcurl are in .venv/bin):\n")
        server = f"--server 127.0.0.1:{running.grpc_port} --token {admin_token}"
        print(f"  quotagate admin {server} account show alice@example.com")
        print(f"  quotagate admin {server} grant alice@example.com 500 --reason 'Asked by e-mail for more tokens.'")
        print(
            f'  grpcurl -plaintext -H \'authorization: Bearer {admin_token}\' -d \'{{"user_id":"alice@example.com",'
            f'"amount":500,"reason":"Asked by e-mail for more tokens."}}\' \\\n'
            f"    127.0.0.1:{running.grpc_port} quotagate.v1.Admin/GrantCredits\n"
        )
        print("  Rate limits: 60 requests a minute per user (see rate_limits in the config).\n")
    print("Ctrl-C stops everything.")
