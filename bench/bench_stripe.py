"""Stripe webhooks: how long crediting a paid Checkout Session takes, and that redeliveries never credit twice.

    scripts/dev python bench/bench_stripe.py [--sessions 200] [--duplicates 5]

quotagate runs as its own process with Stripe on and a webhook secret of this run's own. Each session is a
`checkout.session.completed` event (paid) for a user of its own, signed as Stripe signs it and posted to
quotagate's HTTP port. Phase 1 posts them one at a time (the latency of one grant: signature check, the
PostgreSQL transaction, the Redis refresh). Phase 2 posts each of other sessions --duplicates times at once,
as a retrying Stripe might; every one must answer 200 and exactly one of them credit. The credit_grants table
is checked at the end: one grant per session, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from typing import Any

import aiohttp
import asyncpg
import common

WEBHOOK_SECRET = "whsec_bench_" + secrets.token_hex(16)
TOKENS = 200_000


def _config_with_stripe(original: Any) -> Any:
    def build(stores: common.Stores, client_key: str) -> dict[str, Any]:
        config: dict[str, Any] = original(stores, client_key)
        config["stripe"] = {"enabled": True, "webhook_secret": WEBHOOK_SECRET}
        config["packages"] = [{"id": "tokens_200k", "tokens": TOKENS, "price": 5000}]
        return config

    return build


def signed_event(session_id: str, user: str) -> tuple[bytes, str]:
    obj = {
        "id": session_id,
        "object": "checkout.session",
        "status": "complete",
        "payment_status": "paid",
        "payment_intent": f"pi_{session_id}",
        "amount_total": 5000,
        "currency": "brl",
        "client_reference_id": user,
        "metadata": {"user_id": user, "package_id": "tokens_200k", "tokens": str(TOKENS)},
    }
    payload = json.dumps(
        {"id": f"evt_{session_id}", "type": "checkout.session.completed", "data": {"object": obj}}
    ).encode()
    t = int(time.time())
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={t},v1={mac}"


async def post(http: aiohttp.ClientSession, url: str, payload: bytes, signature: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with http.post(url, data=payload, headers={"stripe-signature": signature}) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"webhook answered {response.status}: {body}")
    return time.perf_counter() - started, str(body["result"])


def latency_row(name: str, latencies: list[float], credited: int, expected: int, seconds: float) -> list[object]:
    ordered = sorted(latencies)
    return [
        name,
        len(latencies),
        credited,
        expected,
        round(common.percentile(ordered, 50) * 1000, 2),
        round(common.percentile(ordered, 99) * 1000, 2),
        round(ordered[-1] * 1000, 2),
        round(len(latencies) / seconds),
    ]


async def main_async(args: argparse.Namespace) -> int:
    common.quotagate_config = _config_with_stripe(common.quotagate_config)  # type: ignore[assignment]
    run = secrets.token_hex(4)
    async with common.Bench("bench-stripe", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        url = f"http://{common.HOST}:{qg.http_port}/webhooks/stripe"
        print(f"bench_stripe: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  quotagate: one process (python -m quotagate.cli serve), HTTP port {qg.http_port}, pid {qg.proc.pid}")
        print(flush=True)

        rows: list[list[object]] = []
        async with aiohttp.ClientSession() as http:
            common.log(f"phase 1: {args.sessions} paid sessions, one at a time ...")
            latencies: list[float] = []
            credited = 0
            started = time.perf_counter()
            for i in range(args.sessions):
                payload, signature = signed_event(f"cs_bench_{run}_a{i}", f"bench-buyer-{run}-a{i}")
                seconds, result = await post(http, url, payload, signature)
                latencies.append(seconds)
                credited += result == "credited"
            rows.append(latency_row("one at a time", latencies, credited, args.sessions, time.perf_counter() - started))

            common.log(f"phase 2: {args.sessions} paid sessions, each {args.duplicates} times at once ...")
            latencies, credited = [], 0
            started = time.perf_counter()
            for i in range(args.sessions):
                payload, signature = signed_event(f"cs_bench_{run}_b{i}", f"bench-buyer-{run}-b{i}")
                results = await asyncio.gather(*(post(http, url, payload, signature) for _ in range(args.duplicates)))
                latencies.extend(seconds for seconds, _ in results)
                credited += sum(result == "credited" for _, result in results)
            rows.append(
                latency_row(
                    f"{args.duplicates} deliveries at once", latencies, credited, args.sessions,
                    time.perf_counter() - started,
                )
            )  # fmt: skip

        conn = await asyncpg.connect(stores.database_url)
        try:
            grants = await conn.fetchval(
                "SELECT count(*) FROM credit_grants WHERE source = 'stripe' AND source_ref LIKE $1", f"cs_bench_{run}_%"
            )
        finally:
            await conn.close()
        common.print_table(
            ["phase", "deliveries", "credited", "expected", "p50 ms", "p99 ms", "max ms", "deliveries/s"],
            rows,
            title="POST /webhooks/stripe, checkout.session.completed (paid), straight to quotagate's HTTP port",
        )
        print(f"credit_grants rows for this run: {grants} (expected {2 * args.sessions})")
        sys.stdout.flush()
        if grants != 2 * args.sessions or any(row[2] != row[3] for row in rows):
            common.log("a session was credited more or less than once")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"))
    parser.add_argument("--sessions", type=int, default=200, help="paid sessions per phase (default 200)")
    parser.add_argument("--duplicates", type=int, default=5, help="deliveries of each event in phase 2 (default 5)")
    parser.add_argument("--log-level", default="WARNING", help="quotagate's log level (default WARNING)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, config) at the end")
    args = parser.parse_args()
    if not 1 <= args.sessions <= 100_000 or not 1 <= args.duplicates <= 50:
        parser.error("--sessions must be in [1, 100000], --duplicates in [1, 50]")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
