"""`quotagate serve` as its own process (optionally with --workers), and Check calls straight over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from harness import ADMIN_TOKEN, CLIENT_KEY, ENVOY_AUTH, ENVOY_TOKEN, PERSONAL_KEY, USAGE_TOKEN

from quotagate.procs import free_port, wait_for_port

CHAT_BODY = json.dumps(
    {"model": "demo-small", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}
).encode()


def check_request(
    key: str | None, user: str | None, request_id: str | None = None, body: bytes = CHAT_BODY
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy sends for POST /v1/chat/completions."""
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if user is not None:
        headers["x-user-id"] = user
    headers["x-request-id"] = request_id or str(uuid.uuid4())
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", headers=headers, raw_body=body
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def check_once(target: str, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    """One Check over a connection of its own, so SO_REUSEPORT may hand it to any worker."""
    # Channels to one target share one connection unless each has its own subchannel pool.
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response: external_auth_pb2.CheckResponse = await stub.Check(request, timeout=10, metadata=ENVOY_AUTH)
        return response


def base_config(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        # A plan id of its own: plans are seeded once per database, and "small" (1,000) is the other tests' plan.
        "default_plan": "served-roomy",
        "plans": [{"id": "served-roomy", "monthly_allowance": 100_000}],
        "clients": [
            {"name": "chat", "key": CLIENT_KEY, "trusted": True},
            {"name": "personal", "key": PERSONAL_KEY, "trusted": False, "user_id": "personal-user"},
        ],
        **(extra or {}),
    }


@dataclass
class Served:
    """A `quotagate serve` subprocess; its combined output goes to a file (a pipe could fill up and block the
    server while a synchronous test holds the event loop)."""

    proc: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log_path: Path
    decision_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def decision_target(self) -> str:
        """Check and ShouldRateLimit on the unary server, where Envoy calls them."""
        return f"127.0.0.1:{self.decision_port}"

    async def terminate(self, timeout: float = 60) -> int:  # noqa: ASYNC109
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def scrape(self) -> str:
        """/metrics over a fresh connection (so, with workers, from whichever worker the kernel picks)."""
        async with httpx.AsyncClient(timeout=10) as client:
            return (await client.get(f"http://127.0.0.1:{self.http_port}/metrics")).text

    async def workers_seen(self, want: int, tries: int = 200) -> dict[str, str]:
        """pid -> the metrics text that pid answered, scraping until `want` distinct pids answered."""
        seen: dict[str, str] = {}
        for _ in range(tries):
            text = await self.scrape()
            match = re.search(r'quotagate_worker_info\{pid="(\d+)",worker="(\d+)"\}', text)
            assert match, text[:500]
            seen[match.group(1)] = text
            if len(seen) >= want:
                break
        return seen


async def start_served(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    *args: str,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Served:
    path = tmp_path / f"quotagate-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({**base_config(), "redis_prefix": redis_prefix, **(config or {})}))
    grpc_port, http_port, decision_port = free_port(), free_port(), free_port()
    full_env = {
        **os.environ,
        "QUOTAGATE_CONFIG": str(path),
        "QUOTAGATE_DATABASE_URL": database_url,
        "QUOTAGATE_REDIS_URL": redis_url,
        "QUOTAGATE_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "QUOTAGATE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "QUOTAGATE_DECISION_LISTEN": f"127.0.0.1:{decision_port}",
        "QUOTAGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "QUOTAGATE_ENVOY_TOKEN": ENVOY_TOKEN,
        "QUOTAGATE_USAGE_TOKEN": USAGE_TOKEN,
        **(env or {}),
    }
    log_path = path.with_suffix(".log")
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quotagate.cli", "serve", *args,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=full_env, start_new_session=True,
        )  # fmt: skip
    served = Served(proc, grpc_port, http_port, log_path, decision_port)
    try:
        await wait_for_port("127.0.0.1", grpc_port, timeout=60)
        await wait_for_port("127.0.0.1", http_port, timeout=30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return served


def kill_group(served: Served) -> None:
    """Last-resort cleanup: the supervisor and its workers share a session of their own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(served.proc.pid, signal.SIGKILL)
