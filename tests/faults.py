"""Helpers of the fault, race and reconcile tests: quotagate as a real process, Checks and reports over gRPC,
the ledger's view of a user, and `quotagate reconcile`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from harness import ADMIN_TOKEN, CLIENT_KEY, ENVOY_AUTH, ENVOY_TOKEN, USAGE_AUTH, USAGE_TOKEN

from quotagate.envoyconf import EnvoyOptions, write_envoy_config
from quotagate.procs import ManagedProcess, free_port, start_envoy, wait_for_port
from quotagate.v1 import usage_pb2, usage_pb2_grpc

MODEL = "demo-small"


def quotagate_config(prefix: str, **overrides: Any) -> dict[str, Any]:
    """The harness's test settings as a YAML config for `quotagate serve` and `quotagate reconcile`."""
    data: dict[str, Any] = {
        "timezone": "America/Sao_Paulo",
        "language": "en",
        "default_plan": "small",
        "estimate": {"minimum": 10, "default_completion_tokens": 50},
        "plans": [{"id": "small", "monthly_allowance": 1000}],
        "clients": [{"name": "chat", "key": CLIENT_KEY, "trusted": True}],
        "redis_prefix": prefix,
    }
    data.update(overrides)
    return data


class QuotagateProcess:
    """`quotagate serve` in a process of its own, so a test can SIGKILL, SIGTERM and start it again."""

    def __init__(self, tmp: Path, database_url: str, redis_url: str, prefix: str, **overrides: Any) -> None:
        self.tmp = tmp
        self.config = tmp / "quotagate.yaml"
        self.config.write_text(yaml.safe_dump(quotagate_config(prefix, **overrides)), encoding="utf-8")
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.decision_port = free_port()
        self.env = {
            **os.environ,
            "QUOTAGATE_DATABASE_URL": database_url,
            "QUOTAGATE_REDIS_URL": redis_url,
            "QUOTAGATE_GRPC_LISTEN": f"127.0.0.1:{self.grpc_port}",
            "QUOTAGATE_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "QUOTAGATE_DECISION_LISTEN": f"127.0.0.1:{self.decision_port}",
            "QUOTAGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "QUOTAGATE_ENVOY_TOKEN": ENVOY_TOKEN,
            "QUOTAGATE_USAGE_TOKEN": USAGE_TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("QUOTAGATE_CONFIG", None)
        self.env.pop("QUOTAGATE_ENV", None)
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.tmp / f"quotagate-{self.starts}.log"

    async def start(self) -> QuotagateProcess:
        self.starts += 1
        argv = [sys.executable, "-m", "quotagate.cli", "serve", "--config", str(self.config)]
        self.proc = ManagedProcess(argv, self.log_path, env=self.env, name="quotagate").start()
        await wait_for_port("127.0.0.1", self.grpc_port, timeout=60, process=self.proc)
        await wait_for_port("127.0.0.1", self.http_port, timeout=30, process=self.proc)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("quotagate-*.log")))

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10)).text


def start_envoy_in_front(qg: QuotagateProcess, upstream_port: int, tmp: Path) -> tuple[ManagedProcess, int, int]:
    """Envoy with Check and ext_proc pointing at `qg` and the demo upstream: (process, listen port, admin port).
    The caller waits for it to be ready (wait_envoy_ready) inside its own cleanup."""
    envoy_port, admin_port = free_port(), free_port()
    config = write_envoy_config(
        EnvoyOptions(
            upstream_host="127.0.0.1",
            upstream_port=upstream_port,
            listen_port=envoy_port,
            admin_port=admin_port,
            authz_port=qg.grpc_port,
            decision_port=qg.decision_port,
            ext_proc=True,
            rate_limit=False,
            envoy_token=ENVOY_TOKEN,
        ),
        tmp / "envoy.yaml",
    )
    return start_envoy(config, tmp / "envoy.log"), envoy_port, admin_port


def check_request(user: str, request_id: str, max_tokens: int = 40, content: str = "hello") -> Any:
    """The CheckRequest Envoy sends for a chat completion."""
    body = json.dumps(
        {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
    ).encode()
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "POST", "/v1/chat/completions", "127.0.0.1"
    http.headers.update(
        {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "authorization": f"Bearer {CLIENT_KEY}",
            "content-type": "application/json",
            "x-user-id": user,
            "x-request-id": request_id,
        }
    )
    http.raw_body = body
    return request


class Client:
    """Check and ReportUsage over one channel."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.authz = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        self.usage = usage_pb2_grpc.UsageStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def check(self, user: str, request_id: str, max_tokens: int = 40) -> bool:
        """True when allowed; False when denied for quota. Other answers and gRPC errors raise."""
        reply = await self.authz.Check(check_request(user, request_id, max_tokens), timeout=10, metadata=ENVOY_AUTH)
        if reply.status.code == code_pb2.OK:
            return True
        if reply.status.code == code_pb2.RESOURCE_EXHAUSTED:
            return False
        raise AssertionError(f"unexpected Check answer {reply.status}")

    async def report(self, user: str, request_id: str, prompt: int, completion: int) -> Any:
        return await self.usage.ReportUsage(
            usage_pb2.ReportUsageRequest(
                request_id=request_id, user_id=user, model=MODEL, prompt_tokens=prompt, completion_tokens=completion
            ),
            timeout=10,
            metadata=USAGE_AUTH,
        )


async def ledger_of(database_url: str, user: str) -> dict[str, Any]:
    """What PostgreSQL recorded for a user: events by request id, tokens charged and allowance used."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, cost, estimated, source, status FROM usage_events WHERE user_id = $1", user
        )
        charged = await conn.fetchval(
            "SELECT coalesce(sum(-amount), 0) FROM ledger_entries WHERE user_id = $1 AND kind = 'usage'", user
        )
        used = await conn.fetchval(
            "SELECT coalesce(sum(allowance_used), 0) FROM account_cycles WHERE user_id = $1", user
        )
    finally:
        await conn.close()
    return {
        "events": {r["request_id"]: dict(r) for r in rows},
        "charged": int(charged),
        "used": int(used),
    }


async def reconcile(config: Path, env: dict[str, str], *args: str) -> tuple[int, Any]:
    """Runs `quotagate reconcile --json` (plus args); returns the exit code and the report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "reconcile", "--config", str(config), "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"reconcile printed no JSON (exit {proc.returncode}): {out!r} {err!r}") from None
    return proc.returncode, report


async def eventually(condition: Callable[[], Awaitable[bool]], seconds: float = 30, what: str = "condition") -> None:
    """Polls `condition` until it holds; fails the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.2)
