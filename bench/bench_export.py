"""Admin.ExportUsage of many usage rows: throughput and quotagate's memory while it streams them.

    scripts/dev python bench/bench_export.py [--rows 100000] [--rounds 1]

Inserts --rows usage events of one account in the cycle 2019-05 straight into usage_events with one
generate_series INSERT (the accounts row first, for the foreign key), then exports them over gRPC as CSV and
as JSON lines with a viewer token. quotagate runs as its own process; its RSS (VmRSS in /proc/<pid>/status)
is read before each export, every 20 ms during it (a background thread) and after it. The peak minus the
baseline is what streaming the export cost in memory; it is printed next to the size of the whole export, so
the two can be compared. Every export is checked: the line count must be --rows (+1 header line for CSV).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import common
import grpc

from quotagate.config import sha256_hex
from quotagate.v1 import admin_pb2, admin_pb2_grpc

CYCLE = "2019-05"
USER = "bench-export-user"
SAMPLE_INTERVAL = 0.020
EXPORT_TIMEOUT = 600.0
MAX_ROWS = 10_000_000
# A viewer token of this run's own, added to the generated config (as its SHA-256) next to the env admin token.
VIEWER_TOKEN = "bench-viewer-" + secrets.token_hex(16)


def _config_with_viewer(original: Any) -> Any:
    def build(stores: common.Stores, client_key: str) -> dict[str, Any]:
        config: dict[str, Any] = original(stores, client_key)
        config["admin_tokens"] = [{"name": "bench-viewer", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"}]
        return config

    return build


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from /proc/<pid>/status, in bytes; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Reads a process's RSS every `interval` seconds in a background thread until stopped."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_bytes(self.pid)
            if value:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class ExportResult:
    fmt: str
    seconds: float
    chunks: int
    total_bytes: int
    lines: int
    rss_before: int
    rss_after: int
    samples: list[int] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max([self.rss_before, self.rss_after, *self.samples])


async def insert_rows(database_url: str, rows: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url, timeout=20)
    try:
        await conn.execute("INSERT INTO accounts (user_id, plan_id) VALUES ($1, $2)", USER, common.BENCH_PLAN)
        await conn.execute(
            """INSERT INTO usage_events (request_id, user_id, model, prompt_tokens, completion_tokens, cost, cycle,
                   occurred_at)
               SELECT 'bench-export-' || lpad(i::text, 8, '0'), $1, 'demo-small', 100 + i % 900, 1 + i % 200,
                      101 + i % 900 + i % 200, $2, timestamptz '2019-05-02 00:00:00+00' + i * interval '1 second'
               FROM generate_series(1, $3::int) AS i""",
            USER,
            CYCLE,
            rows,
        )
        await conn.execute("ANALYZE usage_events")
        count = await conn.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", USER)
    finally:
        await conn.close()
    if count != rows:
        raise RuntimeError(f"inserted {count} rows, expected {rows}")
    return time.perf_counter() - started


async def run_export(target: str, pid: int, fmt: str) -> ExportResult:
    request = admin_pb2.ExportUsageRequest(user_id=USER, cycle=CYCLE, format=fmt)
    metadata = [("authorization", f"Bearer {VIEWER_TOKEN}")]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        await asyncio.sleep(0.5)  # let the server settle before the baseline
        rss_before = rss_bytes(pid)
        chunks = total = lines = 0
        with RssSampler(pid) as sampler:
            started = time.perf_counter()
            stream = stub.ExportUsage(request, metadata=metadata, timeout=EXPORT_TIMEOUT)
            async for chunk in stream:
                # Count and drop each chunk: the client keeps nothing either.
                chunks += 1
                total += len(chunk.data)
                lines += chunk.data.count(b"\n")
            seconds = time.perf_counter() - started
        rss_after = rss_bytes(pid)
    return ExportResult(fmt, seconds, chunks, total, lines, rss_before, rss_after, sampler.samples)


def mib(value: float) -> float:
    return round(value / 2**20, 1)


async def main_async(args: argparse.Namespace) -> int:
    common.quotagate_config = _config_with_viewer(common.quotagate_config)  # type: ignore[assignment]
    async with common.Bench("bench-export", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        pid = qg.proc.pid
        common.log(f"inserting {args.rows:,} usage rows ...")
        insert_seconds = await insert_rows(stores.database_url, args.rows)

        print(f"bench_export: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        print(f"  quotagate: one process (python -m quotagate.cli serve), gRPC {qg.grpc_target}, pid {pid}")
        print(
            f"  data: {args.rows:,} usage_events of one account in cycle {CYCLE}, inserted with one generate_series "
            f"INSERT in {insert_seconds:.2f} s"
        )
        print(f"  RSS: VmRSS of the quotagate process, sampled every {SAMPLE_INTERVAL * 1000:.0f} ms during the export")
        print(flush=True)

        rows: list[list[object]] = []
        failures: list[str] = []
        for round_no in range(1, args.rounds + 1):
            for fmt in ("csv", "jsonl"):
                common.log(f"round {round_no}: exporting {fmt} ...")
                r = await run_export(qg.grpc_target, pid, fmt)
                expected = args.rows + (1 if fmt == "csv" else 0)
                ok = r.lines == expected
                if not ok:
                    failures.append(f"{fmt} round {round_no}: {r.lines:,} lines, expected {expected:,}")
                increase = r.peak - r.rss_before
                rows.append(
                    [round_no, fmt, r.lines, "yes" if ok else "NO", r.chunks, round(r.seconds, 2),
                     round(args.rows / r.seconds), mib(r.total_bytes), mib(r.rss_before), mib(r.peak),
                     mib(r.rss_after), mib(increase), round(100 * increase / r.total_bytes, 1), len(r.samples)]
                )  # fmt: skip
        common.print_table(
            ["round", "format", "lines", "ok", "chunks", "seconds", "rows/s", "export MiB", "RSS before MiB",
             "RSS peak MiB", "RSS after MiB", "peak-before MiB", "% of export", "samples"],
            rows,
            title="ExportUsage (one call at a time; the client counts and drops each chunk)",
        )  # fmt: skip
        sys.stdout.flush()
        if failures:
            for failure in failures:
                common.log(f"line count mismatch: {failure}")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"))
    parser.add_argument("--rows", type=int, default=100_000, help="usage rows to insert and export (default 100000)")
    parser.add_argument("--rounds", type=int, default=1, help="times to export each format (default 1)")
    parser.add_argument("--log-level", default="INFO", help="quotagate's log level (default INFO)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, config) at the end")
    args = parser.parse_args()
    if not 1 <= args.rows <= MAX_ROWS or not 1 <= args.rounds <= 10:
        parser.error(f"--rows must be in [1, {MAX_ROWS}], --rounds in [1, 10]")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
