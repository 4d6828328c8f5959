"""The settlement of one completion in the ledger of record: PostgresLedger.record_usage, calls/s and latency.

    scripts/dev python bench/bench_ledger.py [--concurrency 1,8] [--users 100] [--seconds 5]

In this process, over a fresh database: --users accounts on a plan whose allowance never runs out
("allowance": each call draws the allowance, one ledger entry) and --users accounts on a plan with no allowance
and two credit grants, one expiring and one not ("credits": each call also draws a grant). Notifications are on,
as in production with e-mails enabled. Each phase is a closed loop of `concurrency` callers, each settling a
new request id for the next account in turn. The round trips to PostgreSQL per call are counted apart, through
a small TCP proxy that counts the client's Query and Sync messages (each is one wait for the server's
ReadyForQuery), over --count calls one at a time; the timed phases go straight to the server. CPU per call:
this process's (the ledger code and asyncpg) and the PostgreSQL backends' (from /proc; "-" if the server is
not local).
Checked at the end: one usage_events row per settled call and the tokens charged adding up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import struct
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import common

from quotagate.core.model import AccountLimits, Plan
from quotagate.store.ports import AccountRecord, NewAccount, NewGrant, UsageRecord
from quotagate.store.postgres import PostgresLedger

PLANS = {
    "allowance": Plan(id="bench-allowance", monthly_allowance=common.HUGE_ALLOWANCE),
    "credits": Plan(id="bench-credits", monthly_allowance=0),
}
COST = 30
GRANT = 10**12

# The untyped requests a client may send before its StartupMessage (SSLRequest, GSSENCRequest).
_PRE_STARTUP = {80877103, 80877104}


class RoundTripCounter:
    """A TCP proxy in front of PostgreSQL that counts the client's Query ('Q') and Sync ('S') messages: the
    server answers each with ReadyForQuery, so each is one round trip. Connect with sslmode=disable."""

    def __init__(self, database_url: str) -> None:
        # The server's address: host and port, or the unix socket of a `?host=/dir` URL (an embedded server).
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        self.port = parts.port or int(query.get("port", 5432))
        self.host = query.get("host") or parts.hostname or common.HOST
        self.round_trips = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, common.HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.host.startswith("/"):
            server_r, server_w = await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        else:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)
        try:
            await asyncio.gather(self._upstream(client_r, server_w), self._downstream(server_r, client_w))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # untyped: length, code (SSLRequest ... then StartupMessage or CancelRequest)
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            writer.write(head + await reader.readexactly(length - 8))
            if code not in _PRE_STARTUP:
                break
        while True:  # typed: one byte, then a length that counts itself
            head = await reader.readexactly(5)
            (length,) = struct.unpack("!i", head[1:])
            body = await reader.readexactly(length - 4)
            if head[:1] in (b"Q", b"S"):
                self.round_trips += 1
            writer.write(head + body)
            await writer.drain()

    @staticmethod
    async def _downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()


def limits_of(account: AccountRecord) -> AccountLimits:
    """As QuotaService.limits_of, over this benchmark's two plans."""
    plan = next(p for p in PLANS.values() if p.id == account.plan_id)
    return AccountLimits(account.status, plan.id, plan.monthly_allowance, plan.warn_threshold, plan.critical_threshold)


async def backend_pids(ledger: PostgresLedger) -> list[int]:
    """The server processes of the pool's connections (their CPU time is read from /proc: a local server only)."""
    async with ledger.pool.acquire() as conn:
        rows = await conn.fetch("""SELECT pid FROM pg_stat_activity
               WHERE datname = current_database() AND backend_type = 'client backend'""")
    return [int(r["pid"]) for r in rows]


def via_proxy(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port", "sslmode")]
    query.append(("sslmode", "disable"))
    return urlunsplit((parts.scheme, f"{netloc}{common.HOST}:{port}", parts.path, urlencode(query), ""))


class Settler:
    """record_usage of new request ids, for the accounts of one kind in turn."""

    def __init__(self, ledger: PostgresLedger, users: list[str], cycle: str) -> None:
        self.ledger, self.users, self.cycle = ledger, users, cycle
        self._next = itertools.count()
        self.charged = 0

    async def call(self) -> None:
        n = next(self._next)
        now = datetime.now(UTC)
        record = UsageRecord(
            f"bench-{uuid.uuid4().hex}", self.users[n % len(self.users)], "demo-small", 10, 20, COST, now,
            source="bench",
        )  # fmt: skip
        outcome, _ = await self.ledger.record_usage(record, self.cycle, now)
        if not outcome.charged:
            raise RuntimeError(f"{record.request_id} was not charged")
        self.charged += 1


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-ledger", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        ledger = await PostgresLedger.connect(stores.database_url, limits_of, notifications=True)
        bench.defer("ledger pool", ledger.close)
        await ledger.migrate()
        await ledger.sync_plans(list(PLANS.values()))
        now = datetime.now(UTC)
        cycle = now.strftime("%Y-%m")
        users: dict[str, list[str]] = {}
        for kind, plan in PLANS.items():
            users[kind] = [f"bench-{kind}-{n}" for n in range(args.users)]
            for user in users[kind]:
                await ledger.ensure_account(NewAccount(user), plan.id)
                if kind == "credits":
                    soon = NewGrant(user, GRANT, "expiring", now + timedelta(days=30), "admin", "bench")
                    await ledger.grant(soon, cycle, now)
                    await ledger.grant(NewGrant(user, GRANT, "lasting", None, "admin", "bench"), cycle, now)

        settlers = {kind: Settler(ledger, users[kind], cycle) for kind in PLANS}
        rows: list[list[object]] = []
        failed = False
        for kind, settler in settlers.items():
            for concurrency in args.concurrency:
                calls = [settler.call] * concurrency
                if args.warmup > 0:
                    await common.closed_loop(calls, args.warmup, record=False)
                backends = await backend_pids(ledger)
                server_cpu = sum(common.process_cpu_seconds(pid) for pid in backends)
                result = await common.closed_loop(calls, args.seconds)
                server_cpu = sum(common.process_cpu_seconds(pid) for pid in backends) - server_cpu
                p50, p99, _ = result.summary()
                per_call_ms = 1000 / max(result.calls, 1)
                rows.append([
                    kind, concurrency, result.calls, round(result.rate), p50, p99, result.errors,
                    result.client_cpu * per_call_ms, server_cpu * per_call_ms,
                ])  # fmt: skip
                if result.errors:
                    failed = True
                    common.log(f"{kind} at {concurrency}: {result.errors} errors, first: {result.first_error}")

        # Round trips, one call at a time through the counting proxy, after a warm-up that prepares every
        # statement on the proxy pool's connections (asyncpg's statement cache is per connection).
        counter = RoundTripCounter(stores.database_url)
        proxy_port = await counter.start()
        bench.defer("round-trip proxy", counter.close)
        counted = await PostgresLedger.connect(
            via_proxy(stores.database_url, proxy_port), limits_of, max_size=1, notifications=True
        )
        bench.defer("counted pool", counted.close)
        per_call: dict[str, float] = {}
        for kind in PLANS:
            counting = Settler(counted, users[kind], cycle)
            for _ in range(args.count):
                await counting.call()
            before = counter.round_trips
            for _ in range(args.count):
                await counting.call()
            per_call[kind] = (counter.round_trips - before) / args.count
            settlers[kind].charged += counting.charged
        for row in rows:
            row.append(per_call[str(row[0])])

        conn = await asyncpg.connect(stores.database_url)
        try:
            events = await conn.fetchval("SELECT count(*) FROM usage_events")
            charged = await conn.fetchval("SELECT coalesce(sum(tokens_charged), 0) FROM account_cycles")
        finally:
            await conn.close()
        settled = sum(s.charged for s in settlers.values())

        print(f"bench_ledger: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {args.users} accounts per kind, {args.seconds:g} s per phase after {args.warmup:g} s of warm-up")
        print(flush=True)
        common.print_table(
            [
                *("kind", "concurrency", "calls", "calls/s", "p50 ms", "p99 ms", "errors"),
                *("client CPU ms/call", "PostgreSQL CPU ms/call", "round trips/call"),
            ],
            rows,
            title="PostgresLedger.record_usage",
        )
        ok = not failed and events == settled and charged == settled * COST
        print(f"check: {events:,} usage_events for {settled:,} settled calls, {charged:,} tokens charged: "
              f"{'ok' if ok else 'FAILED'}")  # fmt: skip
        sys.stdout.flush()
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)  # --users: accounts of each kind
    parser.add_argument("--concurrency", default="1,8", help="callers in flight per phase (default 1,8)")
    parser.add_argument("--count", type=int, default=200, help="calls whose round trips are counted (default 200)")
    args = parser.parse_args()
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency takes levels like 1,8")
    if not all(1 <= c <= 64 for c in args.concurrency) or not 1 <= args.users <= 10_000:
        parser.error("--concurrency levels must be in [1, 64], --users in [1, 10000]")
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 1 <= args.count <= 100_000:
        parser.error("--seconds must be in (0, 600], --warmup in [0, 60], --count in [1, 100000]")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
