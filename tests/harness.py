"""Starts the real parts for end-to-end tests: quotagate (in this process), the demo upstream and Envoy."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import redis.asyncio as aioredis

from quotagate.adapters.credentials import bearer_metadata
from quotagate.config import Settings, parse_settings
from quotagate.core.clock import Clock
from quotagate.demo_upstream import start_demo_upstream
from quotagate.envoyconf import EnvoyOptions, write_envoy_config
from quotagate.procs import ManagedProcess, free_port, start_envoy, wait_envoy_ready
from quotagate.server import Running, start
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc

CLIENT_KEY = "test-chat-key"
PERSONAL_KEY = "test-personal-key"
ADMIN_TOKEN = "test-admin-token"
# The caller tokens: Envoy's (Check, ShouldRateLimit, ext_proc) and the usage reporter's (ReportUsage).
ENVOY_TOKEN = "test-envoy-token"
USAGE_TOKEN = "test-usage-token"
ENVOY_AUTH = bearer_metadata(ENVOY_TOKEN)  # metadata= of a call a test makes as Envoy
USAGE_AUTH = bearer_metadata(USAGE_TOKEN)  # metadata= of a ReportUsage


def make_settings(database_url: str, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings for a test: a small plan, a trusted client and an untrusted personal key."""
    data: dict[str, Any] = {
        "timezone": "America/Sao_Paulo",
        "language": "en",
        "default_plan": "small",
        "credits_email": "creditos@example.com",
        "estimate": {"minimum": 10, "default_completion_tokens": 50},
        "plans": [{"id": "small", "monthly_allowance": 1000}],
        "clients": [
            {"name": "chat", "key": CLIENT_KEY, "trusted": True},
            {"name": "personal", "key": PERSONAL_KEY, "trusted": False, "user_id": "personal-user"},
        ],
        "redis_prefix": prefix,
    }
    data.update(overrides)
    if "plans" in overrides and "default_plan" not in overrides:
        # The database keeps the first definition of a plan id (the config only seeds missing plans), and all
        # tests share one database: a test with plans of its own gives them their own ids, the first the default.
        data["default_plan"] = overrides["plans"][0]["id"]
    env = {
        **deploy_env(database_url, redis_url),
        "QUOTAGATE_ENVOY_TOKEN": ENVOY_TOKEN,
        "QUOTAGATE_USAGE_TOKEN": USAGE_TOKEN,
    }
    return parse_settings(data, "<test>", env)


def deploy_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The deploy-time environment of a test's quotagate: its stores, free ports and the admin token."""
    return {
        "QUOTAGATE_DATABASE_URL": database_url,
        "QUOTAGATE_REDIS_URL": redis_url,
        "QUOTAGATE_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
        "QUOTAGATE_DECISION_LISTEN": f"127.0.0.1:{free_port()}",
        "QUOTAGATE_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "QUOTAGATE_ADMIN_TOKEN": ADMIN_TOKEN,
    }


@dataclass
class Stack:
    settings: Settings
    tmp: Path
    clock: Clock | None = None
    # Usage capture through Envoy's ext_proc; off where a test reports usage itself with ReportUsage.
    ext_proc: bool = False
    # Envoy's rate-limit filter calling quotagate's ShouldRateLimit.
    rate_limit: bool = False
    # Any other EnvoyOptions fields (timeouts, say).
    envoy_options: dict[str, Any] = field(default_factory=dict)
    # (host, port) of an upstream that is already running (e.g. a LiteLLM proxy); None starts the demo upstream.
    upstream: tuple[str, int] | None = None
    quotagate: Running | None = None
    envoy: ManagedProcess | None = None
    envoy_port: int = 0
    admin_port: int = 0
    upstream_port: int = 0
    _cleanups: list[Any] = field(default_factory=list)

    async def __aenter__(self) -> Stack:
        try:
            return await self._start()
        except BaseException:
            # `async with` does not call __aexit__ when __aenter__ fails: stop what did start (a quotagate
            # left running went on logging, and its sockets were reported unclosed by later tests).
            await self.__aexit__()
            raise

    async def _start(self) -> Stack:
        await self.start_quotagate()
        upstream_host = "127.0.0.1"
        if self.upstream is not None:
            upstream_host, self.upstream_port = self.upstream
        else:
            runner, self.upstream_port = await start_demo_upstream()
            self._cleanups.append(runner)
        self.envoy_port = free_port()
        self.admin_port = admin_port = free_port()
        config = write_envoy_config(
            EnvoyOptions(
                upstream_host=upstream_host,
                upstream_port=self.upstream_port,
                listen_port=self.envoy_port,
                admin_port=admin_port,
                **{
                    "authz_port": self.grpc_port,
                    "decision_port": self.decision_port,
                    "http_port": self.http_port,
                    "envoy_token": self.settings.envoy_token,
                    "ext_proc": self.ext_proc,
                    "rate_limit": self.rate_limit,
                    **self.envoy_options,  # e.g. decision_port 0: every call to the grpc.aio port
                },
            ),
            self.tmp / "envoy.yaml",
        )
        self.envoy = start_envoy(config, self.tmp / "envoy.log")
        await wait_envoy_ready(admin_port, process=self.envoy)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.envoy_port}", timeout=30)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.usage = usage_pb2_grpc.UsageStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        return self

    @property
    def grpc_port(self) -> int:
        _, _, port = self.settings.grpc_listen.rpartition(":")
        return int(port)

    @property
    def decision_port(self) -> int:
        _, _, port = self.settings.decision_listen.rpartition(":")
        return int(port) if port else 0

    @property
    def http_port(self) -> int:
        _, _, port = self.settings.http_listen.rpartition(":")
        return int(port)

    async def start_quotagate(self) -> Running:
        self.quotagate = await start(self.settings, clock=self.clock)
        return self.quotagate

    async def stop_quotagate(self) -> None:
        if self.quotagate is not None:
            await self.quotagate.stop()
            self.quotagate = None

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        with contextlib.suppress(Exception):
            await self.http.aclose()
        if self.envoy is not None:
            self.envoy.stop()
        for runner in self._cleanups:
            await runner.cleanup()
        await self.stop_quotagate()

    async def chat(
        self,
        user: str | None,
        *,
        key: str | None = CLIENT_KEY,
        max_tokens: int = 40,
        content: str = "hello there",
        completion_tokens: int | None = None,
        extra_headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        if user is not None:
            headers["x-user-id"] = user
        if completion_tokens is not None:
            headers["x-demo-completion-tokens"] = str(completion_tokens)
        headers.update(extra_headers or {})
        body = {
            "model": "demo-small",
            "max_tokens": max_tokens,
            "stream": stream,
            "messages": [{"role": "user", "content": content}],
        }
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)

    async def report(
        self, user: str, request_id: str, prompt: int, completion: int = 0
    ) -> usage_pb2.ReportUsageResponse:
        return await self.usage.ReportUsage(
            usage_pb2.ReportUsageRequest(
                request_id=request_id,
                user_id=user,
                model="demo-small",
                prompt_tokens=prompt,
                completion_tokens=completion,
            ),
            metadata=USAGE_AUTH,
        )

    async def grant(self, user: str, amount: int, reason: str = "Asked by e-mail for more tokens.") -> Any:
        return await self.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(user_id=user, amount=amount, reason=reason),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )

    async def account(self, user: str) -> admin_pb2.Account:
        return await self.admin.GetAccount(
            admin_pb2.GetAccountRequest(user_id=user), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")]
        )

    async def envoy_counters(self, prefix: str) -> dict[str, int]:
        """Envoy's counters whose names start with `prefix`, from its admin interface."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.admin_port}/stats", params={"filter": f"^{prefix}"})
        counters: dict[str, int] = {}
        for line in response.text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                counters[name] = int(value)
        return counters

    async def upstream_requests(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.upstream_port}/_demo/requests")
            data: list[dict[str, Any]] = response.json()
            return data


async def forget_prefix(redis_url: str, prefix: str) -> None:
    """Deletes every Redis key under `prefix` (a test's own)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
