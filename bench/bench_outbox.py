"""The usage outbox: how fast settlements are kept while PostgreSQL is away, and how fast they catch up.

    scripts/dev python bench/bench_outbox.py [--records 5000] [--users 100]

Creates --users accounts in a fresh database and loads their balances into Redis, then (in this process, over
the real stores) keeps --records settled usages in the outbox with the Lua step a settlement takes while
PostgreSQL cannot be reached (16 at a time), and drains them with QuotaService.drain_outbox, the sweeper's
call, once PostgreSQL is there. Checked at the end: one usage_events row per record, the outbox empty, no hold
left in any balance.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime

import asyncpg
import common

from quotagate.config import parse_settings
from quotagate.core.clock import SystemClock
from quotagate.metrics import Metrics
from quotagate.outbox import OutboxItem, UsageOutbox
from quotagate.service import OUTBOX_CONCURRENCY, QuotaService
from quotagate.store.ports import NewAccount, UsageRecord
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import RedisHotState

QUEUE_CONCURRENCY = 16


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-outbox", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        settings = parse_settings(
            {"plans": [{"id": "bench", "monthly_allowance": 10**12}], "default_plan": "bench",
             "redis_prefix": stores.redis_prefix},
            "<bench>",
            {"QUOTAGATE_DATABASE_URL": stores.database_url, "QUOTAGATE_REDIS_URL": stores.redis_url},
        )  # fmt: skip
        box: list[QuotaService] = []
        ledger = await PostgresLedger.connect(stores.database_url, lambda a: box[0].limits_of(a))
        bench.defer("ledger pool", ledger.close)
        hot = RedisHotState.from_url(stores.redis_url, stores.redis_prefix)
        bench.defer("redis clients", hot.close)
        outbox = UsageOutbox(hot.client, stores.redis_prefix)
        service = QuotaService(settings, ledger, hot, SystemClock(), Metrics(), outbox)
        box.append(service)
        await ledger.migrate()
        await ledger.sync_plans(settings.plans)
        now = datetime.now(UTC)
        cycle = service.cycle(now).key
        users = [f"bench-outbox-{n}" for n in range(args.users)]
        for user in users:
            await ledger.ensure_account(NewAccount(user), "bench")
            await hot.load(await ledger.snapshot(user, cycle, now))

        items = [
            OutboxItem(
                UsageRecord(f"bench-{n}", users[n % len(users)], "demo-small", 10, 20, cost=30, occurred_at=now),
                cycle,
            )
            for n in range(args.records)
        ]
        gate = asyncio.Semaphore(QUEUE_CONCURRENCY)

        async def keep(item: OutboxItem) -> bool:
            async with gate:
                return await outbox.queue(item)

        started = time.perf_counter()
        kept = sum(await asyncio.gather(*(keep(item) for item in items)))
        queue_seconds = time.perf_counter() - started
        started = time.perf_counter()
        drained = await service.drain_outbox()
        drain_seconds = time.perf_counter() - started

        conn = await asyncpg.connect(stores.database_url)
        try:
            events = await conn.fetchval("SELECT count(*) FROM usage_events")
        finally:
            await conn.close()
        left = await outbox.size()
        held = 0
        for user in users:
            view = await hot.view(user, cycle, time.time())
            held += view.reserved if view is not None else 0

        print(f"bench_outbox: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  {args.records:,} records over {args.users} accounts")
        print(f"  drain: {OUTBOX_CONCURRENCY} ledger writes at a time")
        print(flush=True)
        common.print_table(
            ["phase", "records", "seconds", "records/s"],
            [
                ["keep (Lua, PostgreSQL away)", kept, round(queue_seconds, 2), round(kept / queue_seconds)],
                ["drain to the ledger", drained, round(drain_seconds, 2), round(drained / drain_seconds)],
            ],
            title="usage outbox",
        )
        ok = kept == drained == events == args.records and left == 0 and held == 0
        verdict = "ok" if ok else "FAILED"
        print(f"check: {events:,} usage_events, {left} records left, {held} tokens still held: {verdict}")
        sys.stdout.flush()
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"))
    parser.add_argument("--records", type=int, default=5000, help="usage records to keep and drain (default 5000)")
    parser.add_argument("--users", type=int, default=100, help="accounts they are spread over (default 100)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir at the end")
    args = parser.parse_args()
    if not 1 <= args.records <= 1_000_000 or not 1 <= args.users <= 100_000:
        parser.error("--records must be in [1, 1000000], --users in [1, 100000]")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
