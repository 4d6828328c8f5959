"""A soak: requests at a steady rate through Envoy with the shipped filters for minutes; memory must stay flat.

    scripts/dev python bench/bench_soak.py --minutes 10 [--rate 100] [--connections 8] [--workers N]

Starts PostgreSQL and Redis (or uses the given ones), quotagate (`serve`, or `serve --workers N`), the demo
upstream and an Envoy built from quotagate.envoyconf with its shipped filters (ext_authz Check, rate limit,
ext_proc usage capture and settlement), with rate limits that are never reached. The load is open-loop: each of
--connections keep-alive connections sends on a fixed schedule, --rate requests/s in all; a request that comes
back after its successor's slot makes the next one late (counted), never skipped. Every request must be a 200.

Each minute it prints the requests, errors, p50/p99 and quotagate's RSS (VmRSS; with workers, summed over
them) and Redis's used_memory; at the end the start and end RSS and the error count. Exit code 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, field

import bench_envoy
import bench_ratelimit
import common
import redis as redis_sync

from quotagate.envoyconf import EnvoyOptions, build_envoy_config
from quotagate.procs import free_port


def rss_bytes(pid: int) -> int:
    """VmRSS of a process plus its living descendants (a supervisor's workers), from /proc."""
    total = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children:
                total += sum(rss_bytes(int(kid)) for kid in children.read().split())
    except OSError:
        pass
    return total


def redis_used_memory(url: str) -> int:
    client = redis_sync.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


@dataclass
class Minute:
    requests: int = 0
    errors: int = 0
    late: int = 0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""


async def paced(conn: bench_envoy.Connection, requests: tuple[bytes, ...], offset: int, interval: float,
                start: float, end: float, minutes: list[Minute]) -> None:  # fmt: skip
    """One connection's share of the load: a request every `interval` seconds from `start`."""
    n = 0
    while True:
        due = start + n * interval
        if due >= end:
            return
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        minute = minutes[min(len(minutes) - 1, int((max(due, start) - start) // 60))]
        if time.perf_counter() - due > interval:
            minute.late += 1
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(conn.request(requests[(offset + n) % len(requests)]), common.CALL_TIMEOUT)
            minute.requests += 1
            minute.latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # counted and reported; the soak goes on
            minute.errors += 1
            minute.first_error = minute.first_error or f"{type(exc).__name__}: {exc}"[:300]
        n += 1


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-soak", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        rate_limits = bench.tmp / "ratelimit.yaml"
        rate_limits.write_text(bench_ratelimit.RATE_LIMITS_YAML, encoding="utf-8")
        qg = await common.start_quotagate(
            bench, stores, log_level=args.log_level, rate_limits=rate_limits, workers=args.workers
        )
        upstream, upstream_port = await bench_envoy.start_upstream(bench)
        options = EnvoyOptions(
            upstream_host=common.HOST,
            upstream_port=upstream_port,
            listen_port=free_port(),
            admin_port=free_port(),
            authz_port=qg.grpc_port,
            decision_port=qg.decision_port,
            envoy_token=common.ENVOY_TOKEN,
        )
        envoy, port = await bench_envoy.start_envoy_target(bench, "soak", build_envoy_config(options), None)
        requests = bench_envoy.build_requests(port, qg.client_key, args.users)
        conns = [bench_envoy.Connection(port) for _ in range(args.connections)]
        for request in requests:  # every account exists before the clock starts
            await conns[0].request(request)

        print(f"bench_soak: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  quotagate: {'one process' if args.workers == 1 else f'serve --workers {args.workers}'}; Envoy with"
              " the shipped filters (Check, rate limit, ext_proc) to the demo upstream")  # fmt: skip
        print(f"  load: {args.rate:g} requests/s on {args.connections} keep-alive connections for "
              f"{args.minutes:g} min (open loop), {args.users} users\n", flush=True)  # fmt: skip

        rss_start = rss_bytes(qg.proc.pid)
        redis_start = redis_used_memory(stores.redis_url)
        metrics_before = common.scrape_metrics(qg.http_port) if args.workers == 1 else {}
        count = max(1, math.ceil(args.minutes))
        minutes = [Minute() for _ in range(count)]
        start = time.perf_counter() + 0.5
        end = start + args.minutes * 60
        interval = args.connections / args.rate
        load = asyncio.gather(*(
            paced(c, requests, i * 7919, interval, start + i * interval / args.connections, end, minutes)
            for i, c in enumerate(conns)
        ))  # fmt: skip
        headers = ["minute", "requests", "req/s", "errors", "late", "p50 ms", "p99 ms", "quotagate RSS MiB",
                   "redis used MiB"]  # fmt: skip
        rows: list[list[object]] = []
        samples: list[int] = []
        for i in range(count):
            mark = start + min((i + 1) * 60, args.minutes * 60)
            await asyncio.sleep(max(0.0, mark - time.perf_counter()))
            rss = rss_bytes(qg.proc.pid)
            samples.append(rss)
            redis_mem = redis_used_memory(stores.redis_url)
            m = minutes[i]
            lat = sorted(m.latencies)
            seconds = min(60.0, args.minutes * 60 - i * 60)
            rows.append([i + 1, m.requests, m.requests / seconds, m.errors, m.late,
                         1000 * common.percentile(lat, 50) if lat else math.nan,
                         1000 * common.percentile(lat, 99) if lat else math.nan,
                         rss / 2**20, redis_mem / 2**20])  # fmt: skip
            common.log(f"minute {i + 1}: {m.requests} requests, {m.errors} errors, RSS {rss / 2**20:.1f} MiB")
        await load
        await asyncio.gather(*(c.close() for c in conns))
        # A last look after the load: settlements still running are done, the sweeper ran at least once.
        await asyncio.sleep(6)
        rss_end = rss_bytes(qg.proc.pid)
        redis_end = redis_used_memory(stores.redis_url)
        metrics_after = common.scrape_metrics(qg.http_port) if args.workers == 1 else {}

        common.print_table(headers, rows, title="Soak through Envoy (per minute)")
        total = sum(m.requests for m in minutes)
        errors = sum(m.errors for m in minutes)
        late = sum(m.late for m in minutes)
        print(f"requests: {total:,} ({total / (args.minutes * 60):,.1f}/s), errors: {errors}, late: {late}")
        print(f"quotagate RSS: start {rss_start / 2**20:.1f} MiB, end {rss_end / 2**20:.1f} MiB "
              f"(change {(rss_end - rss_start) / 2**20:+.1f} MiB; minute samples "
              f"{min(samples) / 2**20:.1f}-{max(samples) / 2**20:.1f} MiB)")  # fmt: skip
        print(f"redis used_memory: start {redis_start / 2**20:.1f} MiB, end {redis_end / 2**20:.1f} MiB")
        if metrics_after:
            charged_key = 'quotagate_usage_reports_total{outcome="charged"}'
            charged = common.metric_delta(metrics_before, metrics_after, charged_key)
            checks = common.metric_delta(metrics_before, metrics_after, "quotagate_decisions_total")
            print(f"quotagate: {checks:,.0f} Checks, {charged:,.0f} usage settlements charged")
        print(f"processes: quotagate pid {qg.proc.pid}, envoy pid {envoy.pid}, upstream pid {upstream.pid}")
        for i, m in enumerate(minutes):
            if m.first_error:
                print(f"minute {i + 1}: first error: {m.first_error}")
        return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second in all (default 100)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="quotagate serve --workers N (default 1)")
    parser.add_argument("--log-level", default="WARNING", help="quotagate's log level (default WARNING)")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 10_000 or not 1 <= args.connections <= 512:
        parser.error("--minutes in (0, 1440], --rate in (0, 10000], --connections in 1..512")
    if args.users < 1 or args.workers < 1:
        parser.error("--users and --workers must be positive")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
