"""Admin.UpdatePlan with many accounts on the plan: how long the call takes while it rewrites their hot state.

    scripts/dev python bench/bench_plans.py [--accounts 1000,10000] [--rounds 3]

For each size: a plan of its own (CreatePlan), that many accounts on it inserted with one generate_series INSERT,
and one Usage.ReportUsage per account (32 at a time, with the usage reporter's caller token), which puts each
account's balance in Redis. Then UpdatePlan changes the plan's allowance --rounds times; each call returns once
every account's hot state holds the new allowance (the next decision uses it). After each call the script reads
the `allowance` field of every balance hash straight from Redis and counts those that do not show the new value:
it must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import common
import grpc
import redis.asyncio as aioredis

from quotagate.config import sha256_hex
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc

MAX_ACCOUNTS = 200_000
REASON = "Benchmark of a plan change."
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(16)


ConfigBuilder = Callable[[common.Stores, str], dict[str, Any]]


def _config_with_admin(original: ConfigBuilder) -> ConfigBuilder:
    def build(stores: common.Stores, client_key: str) -> dict[str, Any]:
        config = original(stores, client_key)
        config["admin_tokens"] = [{"name": "bench-admin", "token_sha256": sha256_hex(ADMIN_TOKEN), "role": "admin"}]
        return config

    return build


async def populate(database_url: str, target: str, plan_id: str, accounts: int) -> tuple[float, float]:
    """Creates the plan and its accounts, then one usage report each; returns the seconds of both steps."""
    metadata = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        await admin.CreatePlan(
            admin_pb2.CreatePlanRequest(id=plan_id, monthly_allowance=1_000_000, reason=REASON), metadata=metadata
        )
        conn = await asyncpg.connect(database_url, timeout=20)
        try:
            await conn.execute(
                """INSERT INTO accounts (user_id, plan_id)
                   SELECT $1 || '-' || lpad(i::text, 7, '0'), $1 FROM generate_series(1, $2::int) AS i""",
                plan_id,
                accounts,
            )
        finally:
            await conn.close()
        inserted = time.perf_counter() - started
        started = time.perf_counter()
        usage = usage_pb2_grpc.UsageStub(channel)
        queue = list(range(1, accounts + 1))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                await usage.ReportUsage(
                    usage_pb2.ReportUsageRequest(
                        request_id=f"{plan_id}-r{i}", user_id=f"{plan_id}-{i:07d}", model="demo-small",
                        prompt_tokens=10, completion_tokens=5,
                    ),
                    metadata=common.USAGE_METADATA, timeout=30,
                )  # fmt: skip

        await asyncio.gather(*(worker() for _ in range(32)))
    return inserted, time.perf_counter() - started


async def stale_hashes(redis_url: str, prefix: str, plan_id: str, accounts: int, allowance: int) -> int:
    cycle = datetime.now(UTC).strftime("%Y-%m")
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(1, accounts + 1):
            pipe.hget(f"{prefix}bal:{plan_id}-{i:07d}:{cycle}", "allowance")
        values = await pipe.execute()
    finally:
        await client.aclose()
    return sum(1 for v in values if v is None or int(v) != allowance)


async def main_async(args: argparse.Namespace) -> int:
    common.quotagate_config = _config_with_admin(common.quotagate_config)  # type: ignore[assignment]
    async with common.Bench("bench-plans", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        print(f"bench_plans: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  quotagate: one process (python -m quotagate.cli serve), gRPC {qg.grpc_target}")
        print(flush=True)
        rows: list[list[object]] = []
        failures = 0
        metadata = [("authorization", f"Bearer {ADMIN_TOKEN}")]
        for accounts in args.accounts:
            plan_id = f"bench-plan-{accounts}"
            common.log(f"{accounts:,} accounts: inserting and reporting one usage each ...")
            inserted, reported = await populate(stores.database_url, qg.grpc_target, plan_id, accounts)
            async with grpc.aio.insecure_channel(qg.grpc_target) as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                for round_no in range(1, args.rounds + 1):
                    allowance = 2_000_000 + round_no
                    started = time.perf_counter()
                    await admin.UpdatePlan(
                        admin_pb2.UpdatePlanRequest(id=plan_id, monthly_allowance=allowance, reason=REASON),
                        metadata=metadata,
                        timeout=600,
                    )
                    seconds = time.perf_counter() - started
                    stale = await stale_hashes(stores.redis_url, stores.redis_prefix, plan_id, accounts, allowance)
                    failures += stale
                    rows.append(
                        [accounts, round(inserted, 2), round(reported, 2), round_no, round(seconds * 1000),
                         round(accounts / seconds), stale]
                    )  # fmt: skip
        common.print_table(
            ["accounts", "insert s", "reports s", "round", "UpdatePlan ms", "accounts/s", "stale hashes"],
            rows,
            title="UpdatePlan of the allowance (returns once every hot balance holds the new value)",
        )
        sys.stdout.flush()
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"))
    parser.add_argument("--accounts", default="1000,10000", help="sizes of the plan, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="UpdatePlan calls per size (default 3)")
    parser.add_argument("--log-level", default="INFO", help="quotagate's log level (default INFO)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, config) at the end")
    args = parser.parse_args()
    try:
        args.accounts = [int(a) for a in args.accounts.split(",")]
    except ValueError:
        parser.error("--accounts takes sizes like 1000,10000")
    if not all(1 <= a <= MAX_ACCOUNTS for a in args.accounts) or not 1 <= args.rounds <= 10:
        parser.error(f"--accounts sizes must be in [1, {MAX_ACCOUNTS}], --rounds in [1, 10]")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
