"""PostgresLedger.record_usage on a real PostgreSQL: what one settlement writes, step by step, with the figures
worked out by hand (the split over allowance, grants and overdraft; ledger entries; the cycle's row; the
notifications), its returned snapshot against a fresh read, settlements of one account racing each other, and
the pool handing back connections without a reset round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from quotagate.core.model import AccountLimits, LedgerSnapshot, Plan
from quotagate.store.ports import AccountRecord, NewAccount, NewGrant, UsageRecord
from quotagate.store.postgres import PostgresLedger

PLAN = Plan(id="settle", monthly_allowance=1000, warn_threshold=0.8, critical_threshold=0.95)
OCTOBER, NOVEMBER = "2026-10", "2026-11"
GRANTED = datetime(2026, 10, 31, 12, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
SOON = NOW + timedelta(days=5)
REASON = "gpt-4o-mini: reported by test"


def limits_of(account: AccountRecord) -> AccountLimits:
    assert account.plan_id == PLAN.id
    return AccountLimits(account.status, PLAN.id, PLAN.monthly_allowance, PLAN.warn_threshold, PLAN.critical_threshold)


@pytest.fixture(scope="module")
async def ledger(database_url: str) -> AsyncIterator[PostgresLedger]:
    store = await PostgresLedger.connect(database_url, limits_of, notifications=True)
    try:
        await store.migrate()
        await store.sync_plans([PLAN])
        yield store
    finally:
        await store.close()


def usage(uid: str, request_id: str, cost: int, succeeded: bool = True) -> UsageRecord:
    return UsageRecord(request_id, uid, "gpt-4o-mini", cost, 0, cost, NOW, source="test", succeeded=succeeded)


async def rows(ledger: PostgresLedger, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with ledger.pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(sql, *args)]


async def entries(ledger: PostgresLedger, uid: str) -> list[tuple[Any, ...]]:
    return await rows(
        ledger,
        """SELECT request_id, draws_from, amount, grant_id, reason FROM ledger_entries
           WHERE user_id = $1 AND kind = 'usage' AND cycle = $2 ORDER BY id""",
        uid,
        NOVEMBER,
    )


async def cycle_row(ledger: PostgresLedger, uid: str, cycle: str = NOVEMBER) -> list[tuple[Any, ...]]:
    return await rows(
        ledger,
        "SELECT allowance_used, tokens_charged, requests FROM account_cycles WHERE user_id = $1 AND cycle = $2",
        uid,
        cycle,
    )


async def test_a_sequence_of_settlements_writes_what_the_split_says(ledger: PostgresLedger, uid: str) -> None:
    await ledger.ensure_account(NewAccount(uid, f"{uid}@example.com", "Test User"), PLAN.id)
    # October: 50 charged (so November's first charge renews), then three grants.
    outcome, _ = await ledger.record_usage(usage(uid, f"{uid}-oct", 50), OCTOBER, GRANTED)
    assert outcome.charged
    expired, _ = await ledger.grant(NewGrant(uid, 100, "promo", NOW - timedelta(hours=1)), OCTOBER, GRANTED)
    soon, _ = await ledger.grant(NewGrant(uid, 200, "trial", SOON), OCTOBER, GRANTED)
    never, _ = await ledger.grant(NewGrant(uid, 300, "purchase"), OCTOBER, GRANTED)

    # (request, cost, succeeded) -> (charged, cost, allowance used, credits, next expiry, version,
    #                                 new ledger entries, cycle row, notifications of November so far)
    steps: list[tuple[tuple[str, int, bool], tuple[Any, ...]]] = [
        # 700 of the allowance: still normal; the first charge of the cycle renews.
        (("r1", 700, True), (True, 700, 700, 500, SOON, 5, [("allowance", -700, None)], (700, 700, 1),
                             ["renewed"])),
        # 200 more: 90% of the allowance, past the warning.
        (("r2", 200, True), (True, 200, 900, 500, SOON, 6, [("allowance", -200, None)], (900, 900, 2),
                             ["renewed", "warn"])),
        # The last 100 of the allowance, then the grant expiring soonest (the expired promo is never drawn).
        (("r3", 250, True), (True, 250, 1000, 350, SOON, 7, [("allowance", -100, None), ("credit", -150, soon)],
                             (1000, 1150, 3), ["renewed", "warn", "critical"])),
        # The rest of that grant, then the one that never expires; no expiry is left.
        (("r4", 100, True), (True, 100, 1000, 250, None, 8, [("credit", -50, soon), ("credit", -50, never)],
                             (1000, 1250, 4), ["renewed", "warn", "critical"])),
        # Past everything: the overdraft is kept on the allowance used, and the account is blocked.
        (("r5", 400, True), (True, 400, 1150, 0, None, 9, [("credit", -250, never), ("overdraft", -150, None)],
                             (1150, 1650, 5), ["renewed", "warn", "critical", "blocked"])),
        # A repeat: the first outcome, nothing written.
        (("r5", 999, True), (False, 400, 1150, 0, None, 9, [], (1150, 1650, 5),
                             ["renewed", "warn", "critical", "blocked"])),
        # A failed request: recorded at cost 0, nothing charged.
        (("r6", 80, False), (False, 0, 1150, 0, None, 9, [], (1150, 1650, 5),
                             ["renewed", "warn", "critical", "blocked"])),
        # A request that cost nothing: settled, nothing charged, no new version.
        (("r7", 0, True), (True, 0, 1150, 0, None, 9, [], (1150, 1650, 5),
                           ["renewed", "warn", "critical", "blocked"])),
        # Blocked already: more overdraft, no new notification.
        (("r8", 10, True), (True, 10, 1160, 0, None, 10, [("overdraft", -10, None)], (1160, 1660, 6),
                            ["renewed", "warn", "critical", "blocked"])),
    ]  # fmt: skip
    written: list[tuple[Any, ...]] = []
    for (name, cost, succeeded), expected in steps:
        charged, recorded, used, credits, expiry, version, new_entries, cycle, kinds = expected
        request_id = f"{uid}-{name}"
        outcome, snapshot = await ledger.record_usage(usage(uid, request_id, cost, succeeded), NOVEMBER, NOW)
        assert (outcome.charged, outcome.cost, outcome.user_id) == (charged, recorded, uid), name
        assert snapshot == LedgerSnapshot(uid, NOVEMBER, limits_of(await _account(ledger, uid)), used, credits,
                                          expiry, version), name  # fmt: skip
        assert snapshot == await ledger.snapshot(uid, NOVEMBER, NOW), name
        written += [(request_id, source, amount, grant, REASON) for source, amount, grant in new_entries]
        assert await entries(ledger, uid) == written, name
        assert await cycle_row(ledger, uid) == [cycle], name
        assert await rows(
            ledger,
            """SELECT kind, amount, status, hook_status FROM notifications
               WHERE user_id = $1 AND cycle = $2 ORDER BY id""",
            uid,
            NOVEMBER,
        ) == [(kind, 0, "pending", "none") for kind in kinds], name

    assert await cycle_row(ledger, uid, OCTOBER) == [(50, 50, 1)]
    grants = await rows(ledger, "SELECT id, remaining FROM credit_grants WHERE user_id = $1 ORDER BY id", uid)
    assert grants == [(expired, 100), (soon, 0), (never, 0)]
    events = await rows(
        ledger, "SELECT request_id, cost, status, cycle FROM usage_events WHERE user_id = $1 AND cycle = $2", uid,
        NOVEMBER,
    )  # fmt: skip
    assert sorted(events) == sorted(
        [(f"{uid}-r{n}", cost, "succeeded", NOVEMBER) for n, cost in [(1, 700), (2, 200), (3, 250), (4, 100),
                                                                      (5, 400), (7, 0), (8, 10)]]
        + [(f"{uid}-r6", 0, "failed", NOVEMBER)]
    )  # fmt: skip


async def _account(ledger: PostgresLedger, uid: str) -> AccountRecord:
    account = await ledger.get_account(uid)
    assert account is not None
    return account


async def test_racing_settlements_of_one_account_all_count(
    ledger: PostgresLedger, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many at once on one account: most find the version moved between their read and their write, and settle
    # again under the row lock. None may be lost or counted twice.
    locked: list[str] = []
    lock_account = PostgresLedger._lock_account

    async def counted(self: PostgresLedger, conn: asyncpg.Connection, user_id: str) -> AccountRecord:
        locked.append(user_id)
        return await lock_account(self, conn, user_id)

    monkeypatch.setattr(PostgresLedger, "_lock_account", counted)
    await ledger.ensure_account(NewAccount(uid), PLAN.id)
    await ledger.grant(NewGrant(uid, 300, "trial", SOON), NOVEMBER, NOW)
    await ledger.grant(NewGrant(uid, 300, "purchase"), NOVEMBER, NOW)
    costs = [40 + n for n in range(30)]  # 1,635 in all: the allowance, then 600 of credits, then 35 of overdraft
    results = await asyncio.gather(
        *(ledger.record_usage(usage(uid, f"{uid}-{n}", cost), NOVEMBER, NOW) for n, cost in enumerate(costs))
    )
    assert all(outcome.charged for outcome, _ in results)
    assert locked.count(uid) - 2 >= 1  # beside the grants' own locks, at least one settlement settled again
    assert sorted(snapshot.version for _, snapshot in results) == list(range(3, 33))
    final = await ledger.snapshot(uid, NOVEMBER, NOW)
    assert (final.allowance_used, final.credits, final.version) == (1035, 0, 32)
    assert max(results, key=lambda r: r[1].version)[1] == final
    # Each snapshot is the balance right after its own charge: spent so far = the charges of versions up to it.
    by_version = sorted(results, key=lambda r: r[1].version)
    spent = 0
    for outcome, snapshot in by_version:
        spent += outcome.cost
        assert snapshot.allowance_used + 600 - snapshot.credits == spent
    assert await cycle_row(ledger, uid) == [(1035, sum(costs), 30)]
    [(total,)] = await rows(ledger, "SELECT sum(amount) FROM ledger_entries WHERE user_id = $1 AND kind = 'usage'", uid)
    assert total == -sum(costs)
    kinds = await rows(ledger, "SELECT kind FROM notifications WHERE user_id = $1 AND cycle = $2 ORDER BY id", uid,
                       NOVEMBER)  # fmt: skip
    assert [k for (k,) in kinds if k != "credits"] == ["warn", "critical", "blocked"]


async def test_released_connections_need_no_reset_round_trip(database_url: str, caplog: Any) -> None:
    ledger = await PostgresLedger.connect(database_url, limits_of, max_size=1)
    try:
        async with ledger.pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        # The server's last statement from that connection is ours: no reset query followed on release.
        watcher = await asyncpg.connect(database_url)
        try:
            last = await watcher.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        finally:
            await watcher.close()
        assert last == "SELECT pg_backend_pid()"
        # A transaction left open is still rolled back before the connection is handed out again.
        with caplog.at_level(logging.ERROR):
            async with ledger.pool.acquire() as conn:
                await conn.execute("BEGIN")
                await conn.execute("CREATE TEMPORARY TABLE left_open (n int)")
        async with ledger.pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    finally:
        await ledger.close()
