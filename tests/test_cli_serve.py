"""`quotagate migrate` and `quotagate serve` as an operator runs them, and the on_store_error policy."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import CLIENT_KEY, Stack, make_settings

from quotagate.procs import free_port, wait_for_port


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode()


async def test_migrate_then_serve_then_sigterm(database_url: str, redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "quotagate.yaml"
    config.write_text(yaml.safe_dump({"clients": [{"name": "chat", "key": CLIENT_KEY, "trusted": True}]}))
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "QUOTAGATE_CONFIG": str(config),
        "QUOTAGATE_DATABASE_URL": database_url,
        "QUOTAGATE_REDIS_URL": redis_url,
        "QUOTAGATE_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "QUOTAGATE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "QUOTAGATE_DECISION_LISTEN": f"127.0.0.1:{free_port()}",
        "QUOTAGATE_ADMIN_TOKEN": "a-long-enough-admin-token",
    }
    code, out = await run_cli("migrate", env=env)
    assert code == 0, out
    assert "applied" in out or "nothing to apply" in out
    code, out = await run_cli("migrate", env=env)
    assert (code, out.strip()) == (0, "nothing to apply")

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        await wait_for_port("127.0.0.1", grpc_port, timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient() as client:
            await wait_for_port("127.0.0.1", http_port, timeout=10)
            assert (await client.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out_bytes, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, out_bytes.decode()
    assert secrets_absent(out_bytes.decode())


def secrets_absent(log: str) -> bool:
    return "a-long-enough-admin-token" not in log and CLIENT_KEY not in log


async def test_production_refuses_to_start_with_the_default_admin_token(tmp_path: Path) -> None:
    env = {**os.environ, "QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": "change-me"}
    env.pop("QUOTAGATE_CONFIG", None)
    code, out = await run_cli("serve", env=env)
    assert code == 1
    assert "QUOTAGATE_ADMIN_TOKEN" in out or "admin" in out


@pytest.mark.parametrize(("policy", "status"), [("deny", 503), ("allow", 200)])
async def test_on_store_error_decides_when_redis_is_unreachable(
    database_url: str, redis_prefix: str, tmp_path: Path, uid: str, policy: str, status: int
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(database_url, dead_redis, redis_prefix, on_store_error=policy)
    async with Stack(settings, tmp_path) as stack:
        response = await stack.chat(uid)
        assert response.status_code == status
        assert stack.quotagate is not None
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{stack.quotagate.http_port}/metrics")).text
        assert f'quotagate_store_errors_total{{policy="{policy}"}} 1.0' in metrics
