"""One behaviour suite for the store ports, run against every backend.

HotState: the in-memory reference (store/memory.py) and RedisHotState on a real Redis.
Ledger: the in-memory reference and PostgresLedger on a real PostgreSQL (one database for the session, so
every test uses its own user ids).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from quotagate.core.errors import InvalidRequest, NotFound
from quotagate.core.model import (
    AccountLimits,
    AccountStatus,
    AdmissionMode,
    LedgerSnapshot,
    Plan,
    Reservation,
)
from quotagate.store.memory import MemoryHotState, MemoryLedger
from quotagate.store.ports import AccountRecord, HotState, Ledger, NewAccount, NewGrant, UsageRecord
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import RedisHotState

CYCLE = "2026-11"
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
T = NOW.timestamp()

PLANS = {
    "small": Plan(id="small", monthly_allowance=1000),
    "big": Plan(id="big", monthly_allowance=100_000, warn_threshold=0.5, critical_threshold=0.9),
}


def limits_of(account: AccountRecord) -> AccountLimits:
    """As QuotaService.limits_of, over the small catalogue above."""
    plan = PLANS[account.plan_id]
    return AccountLimits(
        status=account.status,
        plan_id=plan.id,
        allowance=account.allowance_override if account.allowance_override is not None else plan.monthly_allowance,
        warn_threshold=account.warn_threshold or plan.warn_threshold,
        critical_threshold=account.critical_threshold or plan.critical_threshold,
    )


def rid() -> str:
    return f"req-{uuid.uuid4().hex[:12]}"


# -- backends -----------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def hot_backend(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for memory, (url, key prefix) for Redis. A plain fixture, so it may pull the async ones."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


@pytest.fixture
async def hot(hot_backend: tuple[str, str] | None) -> AsyncIterator[HotState]:
    if hot_backend is None:
        yield MemoryHotState()
        return
    store = RedisHotState.from_url(*hot_backend)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def redis_hot(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisHotState]:
    store = RedisHotState.from_url(redis_url, redis_prefix)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
async def postgres_ledger(database_url: str) -> AsyncIterator[PostgresLedger]:
    ledger = await PostgresLedger.connect(database_url, limits_of)
    try:
        await ledger.migrate()
        await ledger.migrate()  # idempotent
        await ledger.sync_plans(list(PLANS.values()))
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture(params=["memory", "postgres"])
def ledger(request: pytest.FixtureRequest) -> MemoryLedger | PostgresLedger:
    if request.param == "memory":
        return MemoryLedger(limits_of)
    store: PostgresLedger = request.getfixturevalue("postgres_ledger")
    return store


# -- hot state ----------------------------------------------------------------------------------------------


def snap(
    user_id: str,
    *,
    version: int,
    used: int = 0,
    credits: int = 0,
    allowance: int = 1000,
    status: AccountStatus = AccountStatus.ACTIVE,
    expiry: datetime | None = None,
    cycle: str = CYCLE,
) -> LedgerSnapshot:
    return LedgerSnapshot(
        user_id=user_id,
        cycle=cycle,
        limits=AccountLimits(
            status=status, plan_id="small", allowance=allowance, warn_threshold=0.8, critical_threshold=0.95
        ),
        allowance_used=used,
        credits=credits,
        next_credit_expiry=expiry,
        version=version,
    )


def hold(user_id: str, estimate: int, request_id: str | None = None, expires_at: float = T + 300) -> Reservation:
    return Reservation(
        request_id=request_id or rid(),
        user_id=user_id,
        cycle=CYCLE,
        estimate=estimate,
        model="gpt-4o-mini",
        expires_at=expires_at,
        plan_id="small",  # reserving records the plan the balance names (snap's)
    )


async def reserve(
    hot: HotState, reservation: Reservation, mode: AdmissionMode = AdmissionMode.STRICT, now: float = T
) -> Any:
    return await hot.reserve(reservation.user_id, reservation.cycle, reservation, mode, now)


async def reserved(hot: HotState, user_id: str, now: float = T) -> int:
    view = await hot.view(user_id, CYCLE, now)
    assert view is not None
    return view.reserved


async def test_missing_account_is_none_until_loaded(hot: HotState, uid: str) -> None:
    assert await reserve(hot, hold(uid, 10)) is None
    assert await hot.view(uid, CYCLE, T) is None
    await hot.load(snap(uid, version=3, used=100, credits=50))
    first = hold(uid, 10)
    result = await reserve(hot, first)
    assert result is not None and result.admitted and not result.duplicate
    assert result.view.limits == snap(uid, version=3).limits
    assert (result.view.allowance_used, result.view.credits, result.view.reserved) == (100, 50, 0)
    assert await reserved(hot, uid) == 10
    assert await hot.peek_reservation(first.request_id) == first
    # Another cycle of the same user is a separate, still missing, balance.
    assert await hot.reserve(uid, "2026-12", hold(uid, 10), AdmissionMode.STRICT, T) is None


async def test_strict_admits_exactly_what_is_left(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=960))  # left 40
    too_big = await reserve(hot, hold(uid, 41))
    assert too_big is not None and not too_big.admitted
    assert await reserved(hot, uid) == 0
    exact = await reserve(hot, hold(uid, 40))
    assert exact is not None and exact.admitted
    assert await reserved(hot, uid) == 40
    one_more = await reserve(hot, hold(uid, 1))
    assert one_more is not None and not one_more.admitted
    assert one_more.view.reserved == 40
    # Nothing billable (listing models) is no pass either with nothing left: a blocked user meets 429 everywhere.
    free = hold(uid, 0)
    nothing = await reserve(hot, free)
    assert nothing is not None and not nothing.admitted
    assert await reserved(hot, uid) == 40
    assert await hot.peek_reservation(free.request_id) is None


async def test_strict_counts_credits_after_the_allowance(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=1000, credits=25))
    assert (await reserve(hot, hold(uid, 26))).admitted is False
    assert (await reserve(hot, hold(uid, 25))).admitted is True


async def test_default_admits_while_anything_is_left(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=999))  # left 1
    big = await reserve(hot, hold(uid, 500), AdmissionMode.DEFAULT)
    assert big is not None and big.admitted
    assert await reserved(hot, uid) == 500
    after = await reserve(hot, hold(uid, 1), AdmissionMode.DEFAULT)  # left is now -499
    assert after is not None and not after.admitted
    assert after.view.reserved == 500


async def test_default_denies_at_exactly_zero_left(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=1010, credits=10))  # left 0
    result = await reserve(hot, hold(uid, 1), AdmissionMode.DEFAULT)
    assert result is not None and not result.admitted
    await hot.load(snap(uid, version=2, used=1010, credits=11))  # left 1
    result = await reserve(hot, hold(uid, 1), AdmissionMode.DEFAULT)
    assert result is not None and result.admitted


async def test_reserved_sum_grows_and_settle_releases_it(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1))
    holds = [hold(uid, n) for n in (10, 20, 30)]
    views = [(await reserve(hot, h)).view.reserved for h in holds]
    assert views == [0, 10, 30]  # each result shows the balance before its own hold
    assert await reserved(hot, uid) == 60
    released = await hot.settle(holds[1].request_id, None)
    assert released == holds[1]
    assert await reserved(hot, uid) == 40
    assert await hot.peek_reservation(holds[1].request_id) is None
    # A second settle of the same request id releases nothing more.
    assert await hot.settle(holds[1].request_id, None) is None
    assert await reserved(hot, uid) == 40


async def test_a_settling_cost_replaces_the_hold_and_counts_as_used_until_settled(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=5, used=100))  # allowance 1000
    done, other = hold(uid, 50), hold(uid, 20)
    await reserve(hot, done)
    await reserve(hot, other)
    assert await hot.mark_settling(done.request_id, 30)
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved, view.settling) == (130, 20, 30)
    # Check decides on the charge, not the hold: 1000 - 130 - 20 = 850 left.
    assert not (await reserve(hot, hold(uid, 851))).admitted
    assert (await reserve(hot, hold(uid, 850))).admitted
    assert not await hot.mark_settling(done.request_id, 30)  # swapped once only
    assert not await hot.mark_settling("never-reserved", 30)
    # The ledger's figures arrive with the settlement and the settling cost goes in the same step.
    assert await hot.settle(done.request_id, snap(uid, version=6, used=130)) is not None
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved, view.settling) == (130, 870, 0)


async def test_settle_applies_a_newer_snapshot_and_ignores_an_older_one(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=5, used=100))
    first, second = hold(uid, 10), hold(uid, 20)
    await reserve(hot, first)
    await reserve(hot, second)
    assert await hot.settle(first.request_id, snap(uid, version=6, used=110)) == first
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved) == (110, 20)
    # An older snapshot arriving late releases its hold but does not roll the balance back.
    assert await hot.settle(second.request_id, snap(uid, version=4, used=50)) == second
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved) == (110, 0)


async def test_load_refuses_older_accepts_equal_and_keeps_reserved(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=7, used=100))
    await reserve(hot, hold(uid, 30))
    await hot.load(snap(uid, version=6, used=1, credits=999))
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.credits, view.reserved) == (100, 0, 30)
    await hot.load(snap(uid, version=7, used=120, credits=5))
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.credits, view.reserved) == (120, 5, 30)
    await hot.load(snap(uid, version=8, used=130, status=AccountStatus.SUSPENDED))
    view = await hot.view(uid, CYCLE, T)
    assert view is not None
    assert (view.allowance_used, view.reserved, view.limits.status) == (130, 30, AccountStatus.SUSPENDED)


async def test_duplicate_reserve_is_refused_and_holds_nothing_more(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=900))  # left 100
    original = hold(uid, 30, request_id=rid())
    first = await reserve(hot, original)
    assert first is not None and first.admitted and not first.duplicate
    # A repeated request id is never a pass: it would ride on the first request's hold and settlement.
    again = await reserve(hot, original)
    assert again is not None and again.duplicate and not again.admitted
    assert again.view.reserved == 30
    # Even with an estimate that would not fit any more, a repeat is a duplicate and holds nothing.
    bigger = await reserve(hot, hold(uid, 500, request_id=original.request_id))
    assert bigger is not None and bigger.duplicate
    assert await reserved(hot, uid) == 30
    assert await hot.peek_reservation(original.request_id) == original


async def test_a_reservation_is_marked_forwarded_once_envoy_sent_its_request_on(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=0))
    original = hold(uid, 30, request_id=rid())
    await reserve(hot, original)
    assert (await hot.peek_reservation(original.request_id)) == original  # not forwarded yet
    assert await hot.mark_forwarded(original.request_id)
    marked = await hot.peek_reservation(original.request_id)
    assert marked is not None and marked.forwarded and marked.estimate == 30
    # A request already settled (or never reserved) leaves nothing behind.
    await hot.settle(original.request_id, None)
    assert not await hot.mark_forwarded(original.request_id)
    assert await hot.peek_reservation(original.request_id) is None
    assert not await hot.mark_forwarded(rid())


async def test_stale_when_a_credit_expiry_has_passed(hot: HotState, uid: str) -> None:
    expiry = NOW + timedelta(hours=1)
    await hot.load(snap(uid, version=1, credits=100, expiry=expiry))
    before = await reserve(hot, hold(uid, 10), now=expiry.timestamp() - 0.5)
    assert before is not None and before.admitted
    assert await reserve(hot, hold(uid, 10), now=expiry.timestamp()) is None
    assert await reserve(hot, hold(uid, 10), now=expiry.timestamp() + 60) is None
    assert await hot.view(uid, CYCLE, expiry.timestamp()) is None
    # The reloaded snapshot (the expired grant gone) makes the balance usable again, hold kept.
    await hot.load(snap(uid, version=2, credits=0))
    after = await reserve(hot, hold(uid, 10), now=expiry.timestamp() + 60)
    assert after is not None and after.admitted and after.view.reserved == 10


async def test_suspended_status_denies(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, credits=10_000, status=AccountStatus.SUSPENDED))
    for mode in AdmissionMode:
        for estimate in (1, 0):
            request = hold(uid, estimate)
            result = await reserve(hot, request, mode)
            assert result is not None and not result.admitted and not result.duplicate
            assert result.view.limits.status is AccountStatus.SUSPENDED
            assert await hot.peek_reservation(request.request_id) is None
    assert await reserved(hot, uid) == 0


async def test_due_reservations_by_expiry_with_limit(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1))
    expiries = {"r-late": T + 300, "r-first": T + 100, "r-mid-b": T + 200, "r-mid-a": T + 200, "r-far": T + 1000}
    for request_id, expires_at in expiries.items():
        assert (await reserve(hot, hold(uid, 5, request_id=request_id, expires_at=expires_at))).admitted
    assert await hot.due_reservations(T + 99, 10) == []
    assert await hot.due_reservations(T + 250, 10) == ["r-first", "r-mid-a", "r-mid-b"]
    assert await hot.due_reservations(T + 300, 10) == ["r-first", "r-mid-a", "r-mid-b", "r-late"]
    assert await hot.due_reservations(T + 5000, 2) == ["r-first", "r-mid-a"]
    assert await hot.due_reservations(T + 5000, 0) == []
    await hot.settle("r-first", None)
    assert await hot.due_reservations(T + 5000, 2) == ["r-mid-a", "r-mid-b"]
    assert await hot.due_reservations(T + 5000, 10) == ["r-mid-a", "r-mid-b", "r-late", "r-far"]


async def test_settle_of_unknown_request_still_applies_the_snapshot(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1, used=10))
    await reserve(hot, hold(uid, 40))
    assert await hot.settle("never-reserved", snap(uid, version=2, used=77)) is None
    view = await hot.view(uid, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved) == (77, 40)
    # Also for an account that had no hot state yet.
    other = f"{uid}-other"
    assert await hot.settle("never-reserved-either", snap(other, version=0, used=5)) is None
    view = await hot.view(other, CYCLE, T)
    assert view is not None and (view.allowance_used, view.reserved) == (5, 0)


async def test_settle_releases_from_the_reserved_cycle_and_applies_the_new_one(hot: HotState, uid: str) -> None:
    # Reserved on the last day of a cycle, settled after the reset: the hold is released where it was placed.
    await hot.load(snap(uid, version=1, used=900))
    held = hold(uid, 50)
    await reserve(hot, held)
    assert await hot.settle(held.request_id, snap(uid, version=2, used=50, cycle="2026-12")) == held
    old_cycle = await hot.view(uid, CYCLE, T)
    new_cycle = await hot.view(uid, "2026-12", T)
    assert old_cycle is not None and (old_cycle.allowance_used, old_cycle.reserved) == (900, 0)
    assert new_cycle is not None and (new_cycle.allowance_used, new_cycle.reserved) == (50, 0)


async def test_forget_drops_the_balance_and_reserved_never_goes_below_zero(hot: HotState, uid: str) -> None:
    await hot.load(snap(uid, version=1))
    old = hold(uid, 30)
    await reserve(hot, old)
    await hot.forget(uid, CYCLE)
    assert await hot.view(uid, CYCLE, T) is None
    assert await reserve(hot, hold(uid, 1)) is None
    await hot.load(snap(uid, version=1))
    assert await reserved(hot, uid) == 0
    await reserve(hot, hold(uid, 10))
    # The hold placed before the balance was forgotten is larger than what is reserved now.
    assert await hot.settle(old.request_id, None) == old
    assert await reserved(hot, uid) == 0
    # Clamped at zero, not carried as a negative sum that would hide the next holds.
    await reserve(hot, hold(uid, 10))
    assert await reserved(hot, uid) == 10


# -- Redis only ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "left", "admitted"),
    [
        (AdmissionMode.STRICT, 10 * 37, 10),
        (AdmissionMode.STRICT, 10 * 37 - 1, 9),
        # Default mode admits while anything is left: the overshoot stays below one estimate.
        (AdmissionMode.DEFAULT, 10 * 37 - 1, 10),
    ],
)
async def test_redis_concurrent_reserves_admit_exactly_what_fits(
    redis_hot: RedisHotState, uid: str, mode: AdmissionMode, left: int, admitted: int
) -> None:
    estimate = 37
    await redis_hot.load(snap(uid, version=1, used=1000 - left))
    results = await asyncio.gather(*(reserve(redis_hot, hold(uid, estimate), mode) for _ in range(200)))
    assert all(r is not None and not r.duplicate for r in results)
    assert sum(1 for r in results if r.admitted) == admitted
    assert await reserved(redis_hot, uid) == admitted * estimate
    assert len(await redis_hot.due_reservations(T + 1000, 1000)) == admitted


async def test_redis_flushed_hot_state_is_missing_not_fresh(
    redis_hot: RedisHotState, redis_prefix: str, uid: str
) -> None:
    await redis_hot.load(snap(uid, version=3, used=1000))  # nothing left
    assert (await reserve(redis_hot, hold(uid, 0))).admitted is False
    assert (await reserve(redis_hot, hold(uid, 10))).admitted is False
    keys = [k async for k in redis_hot.client.scan_iter(match=redis_prefix + "*")]
    assert keys
    await redis_hot.client.delete(*keys)
    # The caller must reload from the ledger; an empty hash must never read as a fresh allowance.
    for mode in AdmissionMode:
        assert await reserve(redis_hot, hold(uid, 10), mode) is None
    assert await redis_hot.view(uid, CYCLE, T) is None


# -- ledger -------------------------------------------------------------------------------------------------


async def new_account(ledger: Ledger, uid: str, plan_id: str = "small") -> AccountRecord:
    return await ledger.ensure_account(NewAccount(uid, f"{uid}@example.com", "Test User"), plan_id)


def usage(uid: str, cost: int, request_id: str | None = None, succeeded: bool = True) -> UsageRecord:
    return UsageRecord(
        request_id=request_id or rid(),
        user_id=uid,
        model="gpt-4o-mini",
        prompt_tokens=cost,
        completion_tokens=0,
        cost=cost,
        occurred_at=NOW,
        source="test",
        succeeded=succeeded,
    )


def decoded(value: Any) -> Any:
    # jsonb comes back from asyncpg as text (no codec is set); the memory ledger returns the same text.
    return None if value is None else json.loads(value)


async def test_ensure_account_creates_once(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    assert await ledger.get_account(uid) is None
    first = await new_account(ledger, uid)
    assert (first.user_id, first.email, first.name, first.plan_id) == (uid, f"{uid}@example.com", "Test User", "small")
    assert (first.status, first.allowance_override, first.created_at.tzinfo is not None) == (
        AccountStatus.ACTIVE,
        None,
        True,
    )
    again = await ledger.ensure_account(NewAccount(uid, "other@example.com", "Other"), "big")
    assert again == first
    assert await ledger.get_account(uid) == first
    snapshot = await ledger.snapshot(uid, CYCLE, NOW)
    assert snapshot == LedgerSnapshot(uid, CYCLE, limits_of(first), 0, 0, None, 0)
    audit = await ledger.audit_entries(uid)
    assert [(a["actor"], a["action"], decoded(a["after"])["plan"]) for a in audit] == [
        ("quotagate", "account.create", "small")
    ]


async def test_unknown_account_is_not_found(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    assert await ledger.get_account(uid) is None
    with pytest.raises(NotFound):
        await ledger.snapshot(uid, CYCLE, NOW)
    with pytest.raises(NotFound):
        await ledger.record_usage(usage(uid, 10), CYCLE, NOW)
    with pytest.raises(NotFound):
        await ledger.grant(NewGrant(uid, 10, "gift", None, "admin", "ops"), CYCLE, NOW)
    with pytest.raises(NotFound):
        await ledger.set_status(uid, AccountStatus.SUSPENDED, "abuse", "ops", CYCLE, NOW)
    assert await ledger.usage_events(uid) == []
    assert await ledger.audit_entries(uid) == []


async def test_record_usage_is_idempotent_under_concurrency(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    request_id = rid()
    results = await asyncio.gather(*(ledger.record_usage(usage(uid, 30, request_id), CYCLE, NOW) for _ in range(5)))
    outcomes = [outcome for outcome, _ in results]
    assert sum(1 for o in outcomes if o.charged) == 1
    assert {(o.cost, o.user_id) for o in outcomes} == {(30, uid)}
    assert {s.allowance_used for _, s in results} == {30}
    # A repeat with other numbers returns the first outcome and changes nothing.
    outcome, snapshot = await ledger.record_usage(usage(uid, 999, request_id), CYCLE, NOW)
    assert (outcome.charged, outcome.cost) == (False, 30)
    assert (snapshot.allowance_used, snapshot.version) == (30, 1)
    events = await ledger.usage_events(uid)
    assert [(e["request_id"], e["cost"], e["status"], e["cycle"]) for e in events] == [
        (request_id, 30, "succeeded", CYCLE)
    ]


async def test_one_request_id_charges_once_even_across_users(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    # A misreported user must not let the same request be charged a second time under another account.
    other = f"{uid}-b"
    await new_account(ledger, uid)
    await new_account(ledger, other)
    request_id = rid()
    results = await asyncio.gather(
        *(ledger.record_usage(usage(user, 30, request_id), CYCLE, NOW) for user in (uid, other, uid, other, uid))
    )
    charged = [outcome for outcome, _ in results if outcome.charged]
    assert len(charged) == 1
    assert {outcome.user_id for outcome, _ in results} == {charged[0].user_id}
    used = [(await ledger.snapshot(user, CYCLE, NOW)).allowance_used for user in (uid, other)]
    assert sorted(used) == [0, 30]


async def test_concurrent_ensure_account_creates_one(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    records = await asyncio.gather(*(new_account(ledger, uid) for _ in range(5)))
    assert len(set(records)) == 1
    assert [a["action"] for a in await ledger.audit_entries(uid)] == ["account.create"]


async def test_usage_events_rows(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    record = UsageRecord(
        request_id=rid(),
        user_id=uid,
        model="gpt-4o",
        prompt_tokens=12,
        completion_tokens=34,
        cost=50,
        occurred_at=NOW - timedelta(minutes=3),
        estimated=True,
        source="expired",
    )
    await ledger.record_usage(record, CYCLE, NOW)
    [event] = await ledger.usage_events(uid)
    assert set(event) == {
        "request_id", "user_id", "model", "prompt_tokens", "completion_tokens", "cost", "cycle", "status",
        "estimated", "source", "occurred_at", "recorded_at",
    }  # fmt: skip
    assert {k: v for k, v in event.items() if k != "recorded_at"} == {
        "request_id": record.request_id,
        "user_id": uid,
        "model": "gpt-4o",
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "cost": 50,
        "cycle": CYCLE,
        "status": "succeeded",
        "estimated": True,
        "source": "expired",
        "occurred_at": NOW - timedelta(minutes=3),
    }


async def test_failed_usage_records_cost_zero_and_charges_nothing(
    ledger: MemoryLedger | PostgresLedger, uid: str
) -> None:
    await new_account(ledger, uid)
    request_id = rid()
    outcome, snapshot = await ledger.record_usage(usage(uid, 40, request_id, succeeded=False), CYCLE, NOW)
    assert (outcome.charged, outcome.cost, outcome.user_id) == (False, 0, uid)
    assert (snapshot.allowance_used, snapshot.version) == (0, 0)
    # A later success report for the same id is a repeat of the first (failed) outcome.
    outcome, snapshot = await ledger.record_usage(usage(uid, 40, request_id), CYCLE, NOW)
    assert (outcome.charged, outcome.cost, snapshot.allowance_used) == (False, 0, 0)
    assert [(e["cost"], e["status"]) for e in await ledger.usage_events(uid)] == [(0, "failed")]


async def test_allowance_first_then_credits_earliest_expiring_first(
    ledger: MemoryLedger | PostgresLedger, uid: str
) -> None:
    await new_account(ledger, uid)
    soon, late = NOW + timedelta(days=5), NOW + timedelta(days=20)
    # Granted in an order unlike the spend order.
    await ledger.grant(NewGrant(uid, 100, "never expires", None, "admin", "ops"), CYCLE, NOW)
    await ledger.grant(NewGrant(uid, 100, "expires late", late, "admin", "ops"), CYCLE, NOW)
    _, snapshot = await ledger.grant(NewGrant(uid, 100, "expires soon", soon, "admin", "ops"), CYCLE, NOW)
    assert (snapshot.credits, snapshot.next_credit_expiry) == (300, soon)

    _, snapshot = await ledger.record_usage(usage(uid, 1050), CYCLE, NOW)  # allowance 1000 + 50 of "soon"
    assert (snapshot.allowance_used, snapshot.credits, snapshot.next_credit_expiry) == (1000, 250, soon)
    _, snapshot = await ledger.record_usage(usage(uid, 100), CYCLE, NOW)  # 50 of "soon" + 50 of "late"
    assert (snapshot.allowance_used, snapshot.credits, snapshot.next_credit_expiry) == (1000, 150, late)
    _, snapshot = await ledger.record_usage(usage(uid, 120), CYCLE, NOW)  # 50 of "late" + 70 of "never"
    assert (snapshot.allowance_used, snapshot.credits, snapshot.next_credit_expiry) == (1000, 30, None)


async def test_expired_grants_are_excluded_and_never_drawn(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    expiry = NOW + timedelta(hours=1)
    await ledger.grant(NewGrant(uid, 100, "short promo", expiry, "promo", "ops"), CYCLE, NOW)
    _, snapshot = await ledger.grant(NewGrant(uid, 100, "purchase", None, "stripe", "ops"), CYCLE, NOW)
    assert (snapshot.credits, snapshot.next_credit_expiry) == (200, expiry)
    at_expiry = await ledger.snapshot(uid, CYCLE, expiry)
    assert (at_expiry.credits, at_expiry.next_credit_expiry) == (100, None)

    later = expiry + timedelta(hours=1)
    _, snapshot = await ledger.record_usage(usage(uid, 1150), CYCLE, later)
    # 1000 allowance, 100 from the purchase, 50 overdraft: the expired promo is not touched.
    assert (snapshot.allowance_used, snapshot.credits, snapshot.next_credit_expiry) == (1050, 0, None)
    before_expiry = await ledger.snapshot(uid, CYCLE, NOW)
    assert (before_expiry.credits, before_expiry.next_credit_expiry) == (100, expiry)


async def test_overdraft_is_kept_on_allowance_used(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    outcome, snapshot = await ledger.record_usage(usage(uid, 1200), CYCLE, NOW)
    assert (outcome.charged, outcome.cost) == (True, 1200)
    assert (snapshot.allowance_used, snapshot.credits) == (1200, 0)
    _, snapshot = await ledger.grant(NewGrant(uid, 500, "top up", None, "admin", "ops"), CYCLE, NOW)
    assert (snapshot.allowance_used, snapshot.credits) == (1200, 500)
    _, snapshot = await ledger.record_usage(usage(uid, 100), CYCLE, NOW)  # no allowance left: credits
    assert (snapshot.allowance_used, snapshot.credits) == (1200, 400)
    # A new cycle starts with nothing spent; the credits carry over.
    fresh = await ledger.snapshot(uid, "2026-12", NOW)
    assert (fresh.allowance_used, fresh.credits) == (0, 400)


@pytest.mark.parametrize(
    ("amount", "expires_at"),
    [(0, None), (-5, None), (10, NOW), (10, NOW - timedelta(seconds=1))],
)
async def test_grant_validation(
    ledger: MemoryLedger | PostgresLedger, uid: str, amount: int, expires_at: datetime | None
) -> None:
    await new_account(ledger, uid)
    with pytest.raises(InvalidRequest):
        await ledger.grant(NewGrant(uid, amount, "bad", expires_at, "admin", "ops"), CYCLE, NOW)
    snapshot = await ledger.snapshot(uid, CYCLE, NOW)
    assert (snapshot.credits, snapshot.version) == (0, 0)
    assert [a["action"] for a in await ledger.audit_entries(uid)] == ["account.create"]
    # Validation comes first: an invalid grant to an unknown account is an invalid request too.
    with pytest.raises(InvalidRequest):
        await ledger.grant(NewGrant(f"{uid}-unknown", amount, "bad", expires_at, "admin", "ops"), CYCLE, NOW)


async def test_version_strictly_increases_on_each_change(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    versions = [(await ledger.snapshot(uid, CYCLE, NOW)).version]
    request_id = rid()
    versions.append((await ledger.record_usage(usage(uid, 10, request_id), CYCLE, NOW))[1].version)
    versions.append((await ledger.grant(NewGrant(uid, 50, "gift", None, "admin", "ops"), CYCLE, NOW))[1].version)
    versions.append((await ledger.record_usage(usage(uid, 1000), CYCLE, NOW))[1].version)  # crosses into credits
    versions.append((await ledger.set_status(uid, AccountStatus.SUSPENDED, "abuse", "ops", CYCLE, NOW)).version)
    versions.append((await ledger.set_status(uid, AccountStatus.ACTIVE, "cleared", "ops", CYCLE, NOW)).version)
    assert versions[0] == 0
    assert all(b > a for a, b in itertools.pairwise(versions))
    # What changes no balance leaves the version alone.
    last = versions[-1]
    assert (await ledger.record_usage(usage(uid, 10, request_id), CYCLE, NOW))[1].version == last
    assert (await ledger.record_usage(usage(uid, 10, succeeded=False), CYCLE, NOW))[1].version == last
    assert (await ledger.record_usage(usage(uid, 0), CYCLE, NOW))[1].version == last
    await new_account(ledger, uid)
    assert (await ledger.snapshot(uid, CYCLE, NOW)).version == last


async def test_set_status_is_reflected_in_the_snapshot(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    snapshot = await ledger.set_status(uid, AccountStatus.SUSPENDED, "chargeback", "ops@example.com", CYCLE, NOW)
    assert snapshot.limits.status is AccountStatus.SUSPENDED
    assert (await ledger.snapshot(uid, CYCLE, NOW)).limits.status is AccountStatus.SUSPENDED
    account = await ledger.get_account(uid)
    assert account is not None and (account.status, account.status_reason) == (AccountStatus.SUSPENDED, "chargeback")
    snapshot = await ledger.set_status(uid, AccountStatus.ACTIVE, "resolved", "ops@example.com", CYCLE, NOW)
    assert snapshot.limits.status is AccountStatus.ACTIVE


async def test_audit_entries_for_grants_and_status_changes(ledger: MemoryLedger | PostgresLedger, uid: str) -> None:
    await new_account(ledger, uid)
    expiry = NOW + timedelta(days=30)
    grant_id, _ = await ledger.grant(NewGrant(uid, 250, "support goodwill", expiry, "admin", "alice"), CYCLE, NOW)
    await ledger.set_status(uid, AccountStatus.SUSPENDED, "abuse report", "bob", CYCLE, NOW)
    await ledger.set_status(uid, AccountStatus.ACTIVE, "appeal accepted", "carol", CYCLE, NOW)
    entries = await ledger.audit_entries(uid)
    assert [(e["actor"], e["action"], e["target"], e["reason"]) for e in entries] == [
        ("quotagate", "account.create", uid, ""),
        ("alice", "credits.grant", uid, "support goodwill"),
        ("bob", "account.suspend", uid, "abuse report"),
        ("carol", "account.activate", uid, "appeal accepted"),
    ]
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    # Both return jsonb columns as asyncpg does without a codec: JSON text.
    assert all(isinstance(e["after"], str) for e in entries)
    grant = entries[1]
    assert decoded(grant["before"]) == {"credits": 0}
    assert decoded(grant["after"]) == {
        "credits": 250,
        "grant_id": grant_id,
        "amount": 250,
        "source": "admin",
        "expires_at": expiry.isoformat(),
    }
    assert (decoded(entries[2]["before"]), decoded(entries[2]["after"])) == (
        {"status": "active"},
        {"status": "suspended"},
    )
    assert (decoded(entries[3]["before"]), decoded(entries[3]["after"])) == (
        {"status": "suspended"},
        {"status": "active"},
    )
    assert entries[0]["before"] is None
