"""`quotagate reconcile`: Redis's balances against the PostgreSQL ledger, drift reported and repaired."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import redis.asyncio as aioredis
import yaml
from faults import Client, quotagate_config, reconcile
from harness import make_settings

from quotagate.server import start


async def test_reconcile_reports_drift_and_repairs_it(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix)
    running = await start(settings)
    config = tmp_path / "quotagate.yaml"
    config.write_text(yaml.safe_dump(quotagate_config(redis_prefix)), encoding="utf-8")
    env = {**os.environ, "QUOTAGATE_DATABASE_URL": database_url, "QUOTAGATE_REDIS_URL": redis_url}
    env.pop("QUOTAGATE_CONFIG", None)
    client = Client(f"127.0.0.1:{running.grpc_port}")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.check(uid, f"{uid}-1")
        assert await client.check(uid, f"{uid}-2")  # stays in flight
        await client.report(uid, f"{uid}-1", prompt=10, completion=20)

        code, report = await reconcile(config, env)
        assert code == 0, report
        assert report["drift"] == []
        assert report["checked"] >= 1
        assert report["reservations"] == 1

        # What a lost write or a stray hand edit leaves behind: a wrong balance and a wrong hold.
        key = f"{redis_prefix}bal:{uid}:{report['cycle']}"
        ledger_used = int(await redis.hget(key, "used") or -1)
        held = int(await redis.hget(key, "reserved") or -1)
        assert ledger_used == 30 and held > 0
        await redis.hset(key, mapping={"used": 999, "reserved": held + 7})

        code, report = await reconcile(config, env)
        assert code == 1
        [drift] = report["drift"]
        assert drift["user_id"] == uid
        assert drift["fields"]["allowance_used"] == {"redis": "999", "ledger": "30"}
        assert drift["fields"]["reserved"] == {"redis": str(held + 7), "ledger": str(held)}

        # The human table names the account and the field.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quotagate.cli", "reconcile", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 1
        table = out.decode()
        assert "1 with drift" in table and uid in table and "allowance_used" in table

        code, report = await reconcile(config, env, "--repair")
        assert code == 0 and report["repaired"] == 1
        assert int(await redis.hget(key, "used") or -1) == 30
        assert int(await redis.hget(key, "reserved") or -1) == held

        code, report = await reconcile(config, env)
        assert (code, report["drift"]) == (0, [])
        # The repaired balance still decides: the reservation in flight settles against it.
        await client.report(uid, f"{uid}-2", prompt=5, completion=5)
        code, report = await reconcile(config, env)
        assert (code, report["drift"], report["reservations"]) == (0, [], 0)
        assert int(await redis.hget(key, "used") or -1) == 40
    finally:
        await redis.aclose()
        await client.close()
        await running.stop()


async def test_reconcile_exits_6_when_a_store_is_unreachable(tmp_path: Path, redis_prefix: str) -> None:
    from quotagate.procs import free_port

    config = tmp_path / "quotagate.yaml"
    config.write_text(yaml.safe_dump(quotagate_config(redis_prefix)), encoding="utf-8")
    env = {
        **os.environ,
        "QUOTAGATE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        "QUOTAGATE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "reconcile", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 6, (out, err)
    assert b"store unavailable" in err


async def test_a_balance_the_ledger_does_not_know_is_drift_and_repair_removes_it(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix)
    running = await start(settings)  # migrates the test database
    await running.stop()
    config = tmp_path / "quotagate.yaml"
    config.write_text(yaml.safe_dump(quotagate_config(redis_prefix)), encoding="utf-8")
    env = {**os.environ, "QUOTAGATE_DATABASE_URL": database_url, "QUOTAGATE_REDIS_URL": redis_url}
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        code, report = await reconcile(config, env)
        assert (code, report["checked"], report["drift"]) == (0, 0, [])
        key = f"{redis_prefix}bal:{uid}:{report['cycle']}"
        await redis.hset(key, mapping={"status": "active", "used": 5, "reserved": 0, "version": 3})
        code, report = await reconcile(config, env)
        assert code == 1
        assert report["drift"] == [
            {"user_id": uid, "fields": {"account": {"redis": "cached", "ledger": "no such account"}}}
        ]
        code, report = await reconcile(config, env, "--repair")
        assert (code, report["repaired"]) == (0, 1)
        assert not await redis.exists(key)
    finally:
        await redis.aclose()
