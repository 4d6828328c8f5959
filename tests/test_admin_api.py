"""quotagate.v1.Admin beyond the basics, against the real server (PostgreSQL, Redis, Envoy): listing accounts,
negative adjustments, usage queries, the ledger and the audit log, cycle resets, and the roles of the tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from harness import ADMIN_TOKEN, USAGE_AUTH, Stack, make_settings

from quotagate.config import Settings, sha256_hex
from quotagate.core.clock import FixedClock
from quotagate.core.errors import InvalidRequest
from quotagate.core.model import AccountLimits, Plan
from quotagate.server import start
from quotagate.store.memory import MemoryLedger
from quotagate.store.ports import AccountRecord, Adjustment, Ledger, NewAccount, NewGrant, UsageRecord
from quotagate.store.postgres import PostgresLedger
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2

VIEWER_TOKEN = "test-viewer-token"
OPERATOR_TOKEN = "test-operator-token"

Metadata = list[tuple[str, str]]


def bearer(token: str) -> Metadata:
    return [("authorization", f"Bearer {token}")]


ADMIN = bearer(ADMIN_TOKEN)
VIEWER = bearer(VIEWER_TOKEN)
OPERATOR = bearer(OPERATOR_TOKEN)


def settings_for(database_url: str, redis_url: str, redis_prefix: str, **overrides: Any) -> Settings:
    return make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin_tokens=[
            {"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"},
            {"name": "operator-bot", "token_sha256": sha256_hex(OPERATOR_TOKEN), "role": "operator"},
        ],
        plans=[{"id": "small", "monthly_allowance": 1000}, {"id": "big", "monthly_allowance": 100_000}],
        **overrides,
    )


def ts(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


async def spend(
    stack: Stack,
    user: str,
    request_id: str,
    prompt: int,
    completion: int = 0,
    *,
    model: str = "demo-small",
    at: datetime | None = None,
) -> usage_pb2.ReportUsageResponse:
    """Charges usage through ReportUsage (which also creates an unknown account on the default plan)."""
    request = usage_pb2.ReportUsageRequest(
        request_id=request_id, user_id=user, model=model, prompt_tokens=prompt, completion_tokens=completion
    )
    if at is not None:
        request.occurred_at.CopyFrom(ts(at))
    return await stack.usage.ReportUsage(request, metadata=USAGE_AUTH)


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def all_audit(stack: Stack, target: str, action: str = "", page_size: int = 0) -> list[admin_pb2.AuditEntry]:
    entries: list[admin_pb2.AuditEntry] = []
    token = ""
    while True:
        page = await stack.admin.ListAuditLog(
            admin_pb2.ListAuditLogRequest(target=target, action=action, page_size=page_size, page_token=token),
            metadata=VIEWER,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def all_accounts(stack: Stack, page_size: int, **filters: str) -> tuple[list[str], int]:
    """Every user id the listing returns, page by page, and the number of pages."""
    users: list[str] = []
    token, pages = "", 0
    while True:
        page = await stack.admin.ListAccounts(
            admin_pb2.ListAccountsRequest(page_size=page_size, page_token=token, **filters), metadata=VIEWER
        )
        pages += 1
        users.extend(a.user_id for a in page.accounts)
        for account in page.accounts:
            assert account.balance.user_id == account.user_id
        token = page.next_page_token
        if not token:
            return users, pages
        assert len(page.accounts) == page_size


async def test_list_accounts_pages_every_account_once_and_filters_by_state_plan_and_text(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        spent = {"normal": 100, "warn": 850, "critical": 960, "blocked": 1000, "suspended": 0}
        for i, (state, cost) in enumerate(spent.items()):
            await spend(stack, f"{uid}-{state}", f"{uid}-r{i}", cost)
        await stack.admin.SuspendAccount(
            admin_pb2.SetAccountStatusRequest(user_id=f"{uid}-suspended", reason="Abuse reported by the team."),
            metadata=OPERATOR,
        )
        for i in range(6):
            await spend(stack, f"{uid}-page{i}", f"{uid}-p{i}", 0)
        response = await stack.chat(
            f"{uid}-named", extra_headers={"x-user-email": "Ana.Souza@Example.com", "x-user-name": "Ana Souza"}
        )
        assert response.status_code == 200

        expected = sorted([*(f"{uid}-{s}" for s in spent), *(f"{uid}-page{i}" for i in range(6)), f"{uid}-named"])
        users, pages = await all_accounts(stack, 3, query=uid)
        assert users == expected  # each exactly once, in user_id order
        assert pages == 4

        for state in ("warn", "critical", "blocked", "suspended"):
            matching, _ = await all_accounts(stack, 1, query=uid, state=state)
            assert matching == [f"{uid}-{state}"], state
        normal, _ = await all_accounts(stack, 2, query=uid, state="normal")
        assert normal == sorted([f"{uid}-normal", *(f"{uid}-page{i}" for i in range(6)), f"{uid}-named"])

        page = await stack.admin.ListAccounts(admin_pb2.ListAccountsRequest(query=f"{uid}-WARN"), metadata=VIEWER)
        [warn] = page.accounts
        assert (warn.balance.state, warn.balance.allowance_used, warn.plan) == ("warn", 850, "small")
        # Text search covers email and name, case-insensitively; the live balance includes the reservation.
        by_email = await stack.admin.ListAccounts(admin_pb2.ListAccountsRequest(query="ana.souza@"), metadata=VIEWER)
        assert f"{uid}-named" in [a.user_id for a in by_email.accounts]
        by_name = await stack.admin.ListAccounts(
            admin_pb2.ListAccountsRequest(query="ana souza", plan="small"), metadata=VIEWER
        )
        [named] = [a for a in by_name.accounts if a.user_id == f"{uid}-named"]
        assert named.email == "Ana.Souza@Example.com"
        assert named.balance.reserved > 0
        # A LIKE wildcard in the query is a literal character, not "anything".
        wildcard = await stack.admin.ListAccounts(admin_pb2.ListAccountsRequest(query=f"{uid}%"), metadata=VIEWER)
        assert list(wildcard.accounts) == []
        assert (await all_accounts(stack, 50, query=uid, plan="big"))[0] == []

        bad = admin_pb2.ListAccountsRequest(state="asleep")
        assert await status_of(stack.admin.ListAccounts(bad, metadata=VIEWER)) == grpc.StatusCode.INVALID_ARGUMENT
        forged = admin_pb2.ListAccountsRequest(page_token="not-a-token!")
        assert await status_of(stack.admin.ListAccounts(forged, metadata=VIEWER)) == grpc.StatusCode.INVALID_ARGUMENT
        huge = await stack.admin.ListAccounts(admin_pb2.ListAccountsRequest(page_size=10_000), metadata=VIEWER)
        assert len(huge.accounts) <= 500


async def test_adjust_credits_removes_earliest_expiring_first_never_below_zero_and_blocks_at_once(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        await spend(stack, uid, f"{uid}-r1", 1000)  # the whole allowance: only credits are left to spend
        soon = await stack.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(
                user_id=uid,
                amount=100,
                reason="Trial credits for the pilot.",
                expires_at=ts(datetime.now(UTC) + timedelta(days=10)),
            ),
            metadata=OPERATOR,
        )
        never = await stack.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(user_id=uid, amount=200, reason="Bought 200 tokens."), metadata=OPERATOR
        )
        reason = "Refund of the purchase, so the credits are taken back."
        first = await stack.admin.AdjustCredits(
            admin_pb2.AdjustCreditsRequest(user_id=uid, amount=150, reason=reason), metadata=OPERATOR
        )
        assert first.removed == 150
        assert first.balance.credits == 150
        assert (await stack.chat(uid)).status_code == 200  # credits left: admitted

        second = await stack.admin.AdjustCredits(
            admin_pb2.AdjustCreditsRequest(user_id=uid, amount=10_000, reason=reason), metadata=OPERATOR
        )
        assert second.removed == 150  # never below zero
        assert second.balance.credits == 0
        assert second.balance.state == "blocked"
        assert (await stack.chat(uid)).status_code == 429  # the hot state saw it at once
        none_left = admin_pb2.AdjustCreditsRequest(user_id=uid, amount=1, reason=reason)
        assert await status_of(stack.admin.AdjustCredits(none_left, metadata=OPERATOR)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )

        ledger = await stack.admin.ListLedger(admin_pb2.ListLedgerRequest(user_id=uid), metadata=VIEWER)
        adjustments = [(e.grant_id, e.amount) for e in reversed(ledger.entries) if e.kind == "adjustment"]
        # The expiring grant goes first, the one that never expires after it.
        assert adjustments == [(soon.grant_id, -100), (never.grant_id, -50), (never.grant_id, -150)]
        assert all(e.actor == "operator-bot" and e.reason == reason for e in ledger.entries if e.kind == "adjustment")

        audit = await all_audit(stack, uid, "credits.adjust")
        assert len(audit) == 2
        newest = audit[0]
        assert (newest.actor, newest.reason) == ("operator-bot", reason)
        assert json.loads(newest.before_json) == {"credits": 150}
        assert json.loads(newest.after_json) == {"credits": 0, "requested": 10_000, "removed": 150}

        for bad in (
            admin_pb2.AdjustCreditsRequest(user_id=uid, amount=5, reason=""),
            admin_pb2.AdjustCreditsRequest(user_id=uid, amount=0, reason=reason),
            admin_pb2.AdjustCreditsRequest(user_id=uid, amount=-5, reason=reason),
        ):
            assert await status_of(stack.admin.AdjustCredits(bad, metadata=OPERATOR)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
        unknown = admin_pb2.AdjustCreditsRequest(user_id=f"{uid}-nobody", amount=5, reason=reason)
        assert await status_of(stack.admin.AdjustCredits(unknown, metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND


async def test_get_usage_by_day_in_the_configured_timezone_by_model_and_for_a_range(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    clock = FixedClock(datetime(2026, 11, 20, 12, tzinfo=UTC))
    settings = settings_for(database_url, redis_url, redis_prefix)  # America/Sao_Paulo, UTC-3
    async with Stack(settings, tmp_path, clock=clock) as stack:
        # 02:00 UTC on the 2nd is still the 1st in São Paulo.
        await spend(stack, uid, f"{uid}-1", 10, 5, model="m-a", at=datetime(2026, 11, 2, 2, tzinfo=UTC))
        await spend(stack, uid, f"{uid}-2", 20, 0, model="m-b", at=datetime(2026, 11, 2, 14, tzinfo=UTC))
        await spend(stack, uid, f"{uid}-3", 1, 1, model="m-a", at=datetime(2026, 11, 5, 9, tzinfo=UTC))
        await spend(stack, uid, f"{uid}-4", 7, 0, model="m-a", at=datetime(2026, 10, 31, 12, tzinfo=UTC))

        async def usage(**fields: Any) -> admin_pb2.GetUsageResponse:
            return await stack.admin.GetUsage(admin_pb2.GetUsageRequest(user_id=uid, **fields), metadata=VIEWER)

        by_day = await usage(cycle="2026-11", group_by="day")
        assert [(r.period, r.requests, r.prompt_tokens, r.completion_tokens, r.cost) for r in by_day.rows] == [
            ("2026-11-01", 1, 10, 5, 15),
            ("2026-11-02", 1, 20, 0, 20),
            ("2026-11-05", 1, 1, 1, 2),
        ]
        assert (by_day.total.requests, by_day.total.cost) == (3, 37)
        assert by_day.start.ToDatetime(UTC) == datetime(2026, 11, 1, 3, tzinfo=UTC)  # local midnight

        by_model = await usage(cycle="2026-11", group_by="model")
        assert [(r.model, r.requests, r.cost) for r in by_model.rows] == [("m-a", 2, 17), ("m-b", 1, 20)]

        ranged = await usage(
            start=ts(datetime(2026, 10, 31, tzinfo=UTC)), end=ts(datetime(2026, 11, 2, 12, tzinfo=UTC))
        )
        assert [(r.requests, r.cost) for r in ranged.rows] == [(2, 22)]

        current = await usage()  # the clock's cycle
        assert current.total.requests == 3
        october = await usage(cycle="2026-10", group_by="model")
        assert [(r.model, r.cost) for r in october.rows] == [("m-a", 7)]

        for bad in (
            {"cycle": "2026-11", "start": ts(datetime(2026, 11, 1, tzinfo=UTC))},
            {"cycle": "November"},
            {"group_by": "week"},
            {"start": ts(datetime(2026, 11, 5, tzinfo=UTC)), "end": ts(datetime(2026, 11, 1, tzinfo=UTC))},
            {"start": ts(datetime(2026, 11, 5, tzinfo=UTC))},
        ):
            assert await status_of(usage(**bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
        missing = admin_pb2.GetUsageRequest(user_id=f"{uid}-nobody")
        assert await status_of(stack.admin.GetUsage(missing, metadata=VIEWER)) == grpc.StatusCode.NOT_FOUND


async def test_audit_log_and_ledger_page_newest_first_with_actor_and_reason(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        await spend(stack, uid, f"{uid}-r1", 30)
        for amount in (10, 20, 30):
            await stack.admin.GrantCredits(
                admin_pb2.GrantCreditsRequest(user_id=uid, amount=amount, reason=f"Grant number {amount}."),
                metadata=ADMIN,
            )
        await stack.admin.SuspendAccount(
            admin_pb2.SetAccountStatusRequest(user_id=uid, reason="Card declined twice."), metadata=OPERATOR
        )
        await stack.admin.ActivateAccount(
            admin_pb2.SetAccountStatusRequest(user_id=uid, reason="The late payment arrived."), metadata=OPERATOR
        )

        audit = await all_audit(stack, uid, page_size=2)
        assert [e.action for e in audit] == [
            "account.activate",
            "account.suspend",
            "credits.grant",
            "credits.grant",
            "credits.grant",
            "account.create",
        ]
        ids = [e.id for e in audit]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        assert [(e.actor, e.reason) for e in audit[:2]] == [
            ("operator-bot", "The late payment arrived."),
            ("operator-bot", "Card declined twice."),
        ]
        assert json.loads(audit[1].before_json) == {"status": "active"}
        assert json.loads(audit[1].after_json) == {"status": "suspended"}
        assert {(e.actor, e.reason) for e in audit[2:5]} == {("env", f"Grant number {n}.") for n in (10, 20, 30)}
        assert all(e.created_at.seconds > 0 and e.target == uid for e in audit)
        grants = await all_audit(stack, uid, "credits.grant", page_size=1)
        assert [json.loads(e.after_json)["amount"] for e in grants] == [30, 20, 10]

        entries: list[admin_pb2.LedgerEntry] = []
        token = ""
        while True:
            page = await stack.admin.ListLedger(
                admin_pb2.ListLedgerRequest(user_id=uid, page_size=2, page_token=token), metadata=VIEWER
            )
            entries.extend(page.entries)
            token = page.next_page_token
            if not token:
                break
        assert [(e.kind, e.draws_from, e.amount) for e in entries] == [
            ("grant", "grant", 30),
            ("grant", "grant", 20),
            ("grant", "grant", 10),
            ("usage", "allowance", -30),
        ]
        assert entries[-1].request_id == f"{uid}-r1"
        assert entries[0].actor == "env" and entries[0].grant_id > 0


async def test_reset_cycle_zeroes_the_allowance_used_and_unblocks_the_next_request(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        await spend(stack, uid, f"{uid}-r1", 1000)
        assert (await stack.chat(uid)).status_code == 429
        reason = "Billing error on our side; the month starts over."
        request = admin_pb2.ResetCycleRequest(user_id=uid, reason=reason)
        assert await status_of(stack.admin.ResetCycle(request, metadata=OPERATOR)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        no_reason = admin_pb2.ResetCycleRequest(user_id=uid, reason=" ")
        assert await status_of(stack.admin.ResetCycle(no_reason, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT

        account = await stack.admin.ResetCycle(request, metadata=ADMIN)
        assert (account.balance.allowance_used, account.balance.state) == (0, "normal")
        assert (await stack.chat(uid)).status_code == 200

        ledger = await stack.admin.ListLedger(admin_pb2.ListLedgerRequest(user_id=uid), metadata=VIEWER)
        resets = [e for e in ledger.entries if e.kind == "reset"]
        assert [(e.amount, e.actor, e.reason) for e in resets] == [(1000, "env", reason)]
        [audit] = await all_audit(stack, uid, "cycle.reset")
        assert (audit.actor, audit.reason) == ("env", reason)
        assert json.loads(audit.before_json)["allowance_used"] == 1000
        assert json.loads(audit.after_json)["allowance_used"] == 0


async def test_roles_and_tokens_on_every_new_call(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        await spend(stack, uid, f"{uid}-r1", 10)
        await stack.grant(uid, 500)
        admin = stack.admin
        reason = "Checking the roles of every token."
        calls: dict[str, tuple[Callable[..., Awaitable[Any]], Any, str]] = {
            "ListAccounts": (admin.ListAccounts, admin_pb2.ListAccountsRequest(query=uid), "viewer"),
            "GetUsage": (admin.GetUsage, admin_pb2.GetUsageRequest(user_id=uid), "viewer"),
            "ListAuditLog": (admin.ListAuditLog, admin_pb2.ListAuditLogRequest(target=uid), "viewer"),
            "ListLedger": (admin.ListLedger, admin_pb2.ListLedgerRequest(user_id=uid), "viewer"),
            "AdjustCredits": (
                admin.AdjustCredits,
                admin_pb2.AdjustCreditsRequest(user_id=uid, amount=1, reason=reason),
                "operator",
            ),
            "ResetCycle": (admin.ResetCycle, admin_pb2.ResetCycleRequest(user_id=uid, reason=reason), "admin"),
        }
        tokens = {"viewer": VIEWER, "operator": OPERATOR, "admin": ADMIN}
        rank = ["viewer", "operator", "admin"]
        for name, (method, request, needed) in calls.items():
            assert await status_of(method(request)) == grpc.StatusCode.UNAUTHENTICATED, name
            assert await status_of(method(request, metadata=bearer("wrong-token"))) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), name
            assert await status_of(method(request, metadata=[("authorization", "Basic abc")])) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), name
            for role in rank:
                if rank.index(role) < rank.index(needed):
                    assert await status_of(method(request, metadata=tokens[role])) == (
                        grpc.StatusCode.PERMISSION_DENIED
                    ), (name, role)
                else:
                    await method(request, metadata=tokens[role])  # allowed: no error
        # Refused calls changed nothing: only the allowed adjustments (operator, admin) and resets (admin) ran.
        assert len(await all_audit(stack, uid, "credits.adjust")) == 2
        assert len(await all_audit(stack, uid, "cycle.reset")) == 1
        balance = (await stack.account(uid)).balance
        assert (balance.credits, balance.allowance_used) == (498, 0)


# -- the two new Ledger methods behave the same in the in-memory reference and in PostgreSQL ---------------

STORE_NOW = datetime(2026, 11, 10, 12, tzinfo=UTC)
STORE_PLAN = Plan(id="small", monthly_allowance=1000)


def store_limits(account: AccountRecord) -> AccountLimits:
    return AccountLimits(account.status, STORE_PLAN.id, STORE_PLAN.monthly_allowance, 0.8, 0.95)


@pytest.fixture(params=["memory", "postgres"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """ "" for the in-memory ledger, else the test database. A plain fixture, so it may pull the async ones."""
    if request.param == "memory":
        return ""
    url: str = request.getfixturevalue("database_url")
    return url


@pytest.fixture
async def any_ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    if not ledger_url:
        yield MemoryLedger(store_limits)
        return
    ledger = await PostgresLedger.connect(ledger_url, store_limits)
    try:
        await ledger.migrate()
        await ledger.sync_plans([STORE_PLAN])
        yield ledger
    finally:
        await ledger.close()


async def test_ledger_adjust_and_reset_cycle_in_both_stores(any_ledger: Ledger, uid: str) -> None:
    ledger, cycle = any_ledger, "2026-11"
    await ledger.ensure_account(NewAccount(uid), "small")
    late, _ = await ledger.grant(NewGrant(uid, 100, "Later grant.", STORE_NOW + timedelta(days=30)), cycle, STORE_NOW)
    early, _ = await ledger.grant(NewGrant(uid, 100, "Early grant.", STORE_NOW + timedelta(days=3)), cycle, STORE_NOW)
    removed, after = await ledger.adjust(Adjustment(uid, 130, "Taken back.", "ops"), cycle, STORE_NOW)
    assert (removed, after.credits) == (130, 70)
    removed, after = await ledger.adjust(Adjustment(uid, 500, "Taken back.", "ops"), cycle, STORE_NOW)
    assert (removed, after.credits) == (70, 0)
    with pytest.raises(InvalidRequest):
        await ledger.adjust(Adjustment(uid, 1, "Nothing left.", "ops"), cycle, STORE_NOW)
    _, charged = await ledger.record_usage(UsageRecord(f"{uid}-r", uid, "m", 400, 0, 400, STORE_NOW), cycle, STORE_NOW)
    assert charged.allowance_used == 400
    reset = await ledger.reset_cycle(uid, "Start over.", "root", cycle, STORE_NOW)
    assert reset.allowance_used == 0
    assert reset.version > charged.version  # the hot state accepts it as newer
    other = await ledger.snapshot(uid, "2026-12", STORE_NOW)
    assert other.allowance_used == 0
    audit = await ledger.audit_entries(uid)  # type: ignore[attr-defined]
    actions = [(a["action"], a["actor"], a["reason"]) for a in audit]
    assert actions[-3:] == [
        ("credits.adjust", "ops", "Taken back."),
        ("credits.adjust", "ops", "Taken back."),
        ("cycle.reset", "root", "Start over."),
    ]
    assert json.loads(audit[-1]["before"]) == {"cycle": cycle, "allowance_used": 400}
    if isinstance(ledger, PostgresLedger):
        entries = await ledger.ledger_entries(uid, 0, 50)
        draws = [(e["grant_id"], e["amount"]) for e in reversed(entries) if e["kind"] == "adjustment"]
        assert draws == [(early, -100), (late, -30), (late, -70)]


# -- a reason is a sentence -----------------------------------------------------------------------------------


async def test_every_reason_must_be_a_sentence(database_url: str, redis_url: str, redis_prefix: str, uid: str) -> None:
    running = await start(settings_for(database_url, redis_url, redis_prefix))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            sentence = "Paid by bank transfer, ticket 17."
            await admin.UpsertAccount(admin_pb2.UpsertAccountRequest(user_id=uid, reason=sentence), metadata=ADMIN)
            calls: list[tuple[Callable[..., Awaitable[Any]], Callable[[str], Any]]] = [
                (admin.GrantCredits, lambda r: admin_pb2.GrantCreditsRequest(user_id=uid, amount=5, reason=r)),
                (admin.AdjustCredits, lambda r: admin_pb2.AdjustCreditsRequest(user_id=uid, amount=1, reason=r)),
                (admin.SuspendAccount, lambda r: admin_pb2.SetAccountStatusRequest(user_id=uid, reason=r)),
                (admin.ActivateAccount, lambda r: admin_pb2.SetAccountStatusRequest(user_id=uid, reason=r)),
                (admin.ResetCycle, lambda r: admin_pb2.ResetCycleRequest(user_id=uid, reason=r)),
                (admin.UpsertAccount, lambda r: admin_pb2.UpsertAccountRequest(user_id=uid, name="M", reason=r)),
                (admin.RevokeClientKey, lambda r: admin_pb2.RevokeClientKeyRequest(name=uid, reason=r)),
            ]
            # Too few words, too few characters, or only blanks: each call refuses before changing anything.
            for short in ("Promo.", "Customer asked.", "a b c d e f", "   Paid   ", ""):
                for method, request in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await method(request(short), metadata=ADMIN)
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, short
                    assert "at least 3 words and 15 characters" in (caught.value.details() or "")
            assert [e["action"] for e in await running.service.ledger.audit_entries(uid)] == [  # type: ignore[attr-defined]
                "account.upsert"
            ]
            granted = await admin.GrantCredits(
                admin_pb2.GrantCreditsRequest(user_id=uid, amount=5, reason="  Goodwill credits for the outage.  "),
                metadata=ADMIN,
            )
            assert granted.balance.credits == 5
            audit = await running.service.ledger.audit_entries(uid)  # type: ignore[attr-defined]
            assert audit[-1]["reason"] == "Goodwill credits for the outage."  # trimmed
    finally:
        await running.stop()
