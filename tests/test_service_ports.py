"""The service's own ports: gRPC health and reflection (grpcurl works without .proto files), HTTP probes and
metrics."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ADMIN_TOKEN, Stack, make_settings


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as running:
        yield running


async def grpcurl(*args: str) -> tuple[int, str, str]:
    binary = os.path.join(os.path.dirname(sys.executable), "grpcurl")
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_health_serving_for_every_service(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    for name in ("", "envoy.service.auth.v3.Authorization", "quotagate.v1.Usage", "quotagate.v1.Admin"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_grpcurl_lists_services_and_runs_admin_calls_by_reflection(stack: Stack, uid: str) -> None:
    address = f"127.0.0.1:{stack.grpc_port}"
    code, out, err = await grpcurl("-plaintext", address, "list")
    assert code == 0, err
    listed = set(out.split())
    assert {
        "envoy.service.auth.v3.Authorization",
        "quotagate.v1.Usage",
        "quotagate.v1.Admin",
        "grpc.health.v1.Health",
    } <= listed

    assert (await stack.chat(uid)).status_code == 200
    auth = f"authorization: Bearer {ADMIN_TOKEN}"
    grant = json.dumps({"user_id": uid, "amount": 250, "reason": "Asked by e-mail for more tokens."})
    code, out, err = await grpcurl("-plaintext", "-H", auth, "-d", grant, address, "quotagate.v1.Admin/GrantCredits")
    assert code == 0, err
    assert json.loads(out)["balance"]["credits"] == "250"  # int64 is a string in proto JSON

    code, out, err = await grpcurl(
        "-plaintext", "-H", auth, "-d", json.dumps({"user_id": uid}), address, "quotagate.v1.Admin/GetAccount"
    )
    assert code == 0, err
    account = json.loads(out)
    assert account["user_id"] == uid and account["balance"]["state"] == "normal"

    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps({"user_id": uid}), address, "quotagate.v1.Admin/GetAccount"
    )
    assert code != 0
    assert "Unauthenticated" in err


async def test_http_probes_and_metrics(stack: Stack, uid: str) -> None:
    assert stack.quotagate is not None
    base = f"http://127.0.0.1:{stack.quotagate.http_port}"
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}

        assert (await stack.chat(uid)).status_code == 200
        assert (await stack.chat(None)).status_code == 401
        metrics = (await client.get("/metrics")).text
    assert 'quotagate_decisions_total{state="normal"} 1.0' in metrics
    assert 'quotagate_decisions_total{state="unauthenticated"} 1.0' in metrics
    assert "quotagate_check_duration_seconds_count 2.0" in metrics


async def test_readyz_reports_a_lost_redis(database_url: str, redis_prefix: str, tmp_path: Path) -> None:
    from quotagate.procs import free_port

    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", redis_prefix)
    from quotagate.server import start

    running = await start(settings)
    try:
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{running.http_port}/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["postgres"] == "ok" and checks["redis"].startswith("error")
    finally:
        await running.stop()
