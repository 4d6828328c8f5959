"""Stripe webhooks: how long crediting a paid Checkout Session takes, and that redeliveries never credit twice.

    scripts/dev python bench/bench_stripe.py [--sessions 200] [--duplicates 5]

quotagate runs as its own process with Stripe on, a webhook secret of this run's own, and Stripe's API played
by the tests' stand-in (tests/stripe_standin.py, in this process, on 127.0.0.1). quotagate credits only checkout
sessions it created itself, so first, before anything is timed, each session is opened the way a buyer opens it:
a user of its own follows quotagate's purchase link (GET /v1/quota/purchase on its HTTP port, with the trusted
client's key), which creates the account, the Checkout Session at the stand-in and quotagate's payment row. Then
each session is paid at the stand-in, and its `checkout.session.completed` event (paid, exactly as the stand-in
holds the session) is signed as Stripe signs it and posted to quotagate's HTTP port. Phase 1 posts them one at a
time (the latency of one grant: signature check, the payment row, the PostgreSQL transaction, the Redis
refresh). Phase 2 posts each of other sessions --duplicates times at once, as a retrying Stripe might; every one
must answer 200 and exactly one of them credit. The credit_grants table is checked at the end: one grant per
session, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import common

# The tests' stand-in for Stripe's API (Checkout Sessions) and their signing of events as Stripe signs them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stripe_standin import SECRET_KEY, StripeStandIn, event, sign

WEBHOOK_SECRET = "whsec_bench_" + secrets.token_hex(16)
PACKAGE = "tokens_200k"
TOKENS = 200_000
# Checkout sessions opened at once before the measure (each: a purchase-link request, a call to the stand-in).
OPEN_CONCURRENCY = 16


def _config_with_stripe(original: Any, api_base: str) -> Any:
    def build(stores: common.Stores, client_key: str) -> dict[str, Any]:
        config: dict[str, Any] = original(stores, client_key)
        config["stripe"] = {
            "enabled": True,
            "secret_key": SECRET_KEY,
            "webhook_secret": WEBHOOK_SECRET,
            "api_base": api_base,
        }
        config["packages"] = [{"id": PACKAGE, "tokens": TOKENS, "price": 5000}]
        return config

    return build


async def open_checkout(http: aiohttp.ClientSession, qg: common.Quotagate, user: str) -> str:
    """The user follows quotagate's purchase link with the trusted client's key; returns the session id quotagate
    created at the stand-in (and recorded in its payments table)."""
    async with http.get(
        f"http://{common.HOST}:{qg.http_port}/v1/quota/purchase",
        params={"package": PACKAGE},
        headers={"authorization": f"Bearer {qg.client_key}", "x-user-id": user},
        allow_redirects=False,
    ) as response:
        if response.status != 303:
            raise RuntimeError(f"purchase link answered {response.status}: {(await response.text())[:300]}")
        return response.headers["location"].rsplit("/", 1)[1]


async def open_checkouts(http: aiohttp.ClientSession, qg: common.Quotagate, users: list[str]) -> list[str]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(user: str) -> str:
        async with gate:
            return await open_checkout(http, qg, user)

    return list(await asyncio.gather(*(one(user) for user in users)))


def signed_event(standin: StripeStandIn, session_id: str) -> tuple[bytes, str]:
    """The session paid at the stand-in, as the checkout.session.completed event Stripe would post, signed."""
    payload = event("checkout.session.completed", standin.pay(session_id))
    return payload, sign(payload, WEBHOOK_SECRET)


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
    run = secrets.token_hex(4)
    async with common.Bench("bench-stripe", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        standin = await StripeStandIn().start()
        bench.defer("stripe stand-in", standin.stop)
        common.quotagate_config = _config_with_stripe(  # type: ignore[assignment]
            common.quotagate_config, standin.base_url
        )
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        url = f"http://{common.HOST}:{qg.http_port}/webhooks/stripe"
        print(f"bench_stripe: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  quotagate: one process (python -m quotagate.cli serve), HTTP port {qg.http_port}, pid {qg.proc.pid}")
        print(f"  Stripe's API: the tests' stand-in (tests/stripe_standin.py) on {standin.base_url}")

        rows: list[list[object]] = []
        async with aiohttp.ClientSession() as http:
            common.log(f"opening {2 * args.sessions} checkout sessions through quotagate's purchase link ...")
            started = time.perf_counter()
            firsts = await open_checkouts(http, qg, [f"bench-buyer-{run}-a{i}" for i in range(args.sessions)])
            seconds_b = await open_checkouts(http, qg, [f"bench-buyer-{run}-b{i}" for i in range(args.sessions)])
            opened = time.perf_counter() - started
            print(f"  opened {2 * args.sessions} checkout sessions (purchase link -> stand-in -> payments row) in "
                  f"{opened:.2f} s, not measured below\n", flush=True)  # fmt: skip

            common.log(f"phase 1: {args.sessions} paid sessions, one at a time ...")
            latencies: list[float] = []
            credited = 0
            started = time.perf_counter()
            for session_id in firsts:
                payload, signature = signed_event(standin, session_id)
                seconds, result = await post(http, url, payload, signature)
                latencies.append(seconds)
                credited += result == "credited"
            rows.append(latency_row("one at a time", latencies, credited, args.sessions, time.perf_counter() - started))

            common.log(f"phase 2: {args.sessions} paid sessions, each {args.duplicates} times at once ...")
            latencies, credited = [], 0
            started = time.perf_counter()
            for session_id in seconds_b:
                payload, signature = signed_event(standin, session_id)
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
                "SELECT count(*) FROM credit_grants WHERE source = 'stripe' AND source_ref = ANY($1::text[])",
                firsts + seconds_b,
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
