"""In-memory reference implementations of the store ports, for fast tests of the service.

They behave as RedisHotState (store/redis.py with store/lua/*.lua) and PostgresLedger (store/postgres.py) do,
and tests/test_stores.py runs one behaviour suite against each pair. Every method finishes without awaiting
anything, so on one event loop each call is as atomic as a Lua script or a ledger transaction.

Not modelled: key TTLs in Redis (a balance hash lives 40 days, a reservation 24 h past its expiry, both by
the wall clock), and the plans table: PostgresLedger.ensure_account with an unknown plan id fails on the
foreign key, while here the account is created and `limits_of` decides what an unknown plan means. Columns
PostgreSQL fills with now() (created_at, recorded_at) take the wall clock here too.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from quotagate.core.charge import OpenGrant, allowance_used_after, spend_order, split_charge
from quotagate.core.decide import Verdict, admits
from quotagate.core.errors import InvalidRequest, NotFound
from quotagate.core.model import (
    AccountStatus,
    AdmissionMode,
    LedgerSnapshot,
    Reservation,
)
from quotagate.store.ports import (
    AccountChanges,
    AccountRecord,
    Adjustment,
    HotView,
    LimitsOf,
    NewAccount,
    NewGrant,
    ReserveResult,
    SettleOutcome,
    UsageRecord,
    account_fields,
)

__all__ = ["MemoryHotState", "MemoryLedger"]


# -- hot state ----------------------------------------------------------------------------------------------


@dataclass
class _HotBalance:
    snapshot: LedgerSnapshot
    reserved: int = 0
    settling: int = 0  # as the balance hash's field (settling.lua)

    def stale(self, now: float) -> bool:
        # As reserve.lua: a credit grant expired, so the credits total must be read again from the ledger.
        expiry = self.snapshot.next_credit_expiry
        return expiry is not None and now >= expiry.timestamp()

    def view(self) -> HotView:
        return HotView(
            limits=self.snapshot.limits,
            allowance_used=self.snapshot.allowance_used + self.settling,
            credits=self.snapshot.credits,
            reserved=max(0, self.reserved),
            settling=self.settling,
        )


class MemoryHotState:
    """The HotState port in a dict: balances per (user, cycle) and the reservations in flight."""

    def __init__(self) -> None:
        self._balances: dict[tuple[str, str], _HotBalance] = {}
        self._reservations: dict[str, Reservation] = {}
        self._settling: dict[str, int] = {}  # request id -> the cost swapped for its hold

    async def reserve(
        self, user_id: str, cycle: str, reservation: Reservation, mode: AdmissionMode, now: float
    ) -> ReserveResult | None:
        balance = self._balances.get((user_id, cycle))
        if balance is None or balance.stale(now):
            return None
        view = balance.view()
        if reservation.request_id in self._reservations:
            return ReserveResult(admitted=False, view=view, duplicate=True)
        left = view.limits.allowance - view.allowance_used + view.credits - view.reserved
        # A free request (estimate 0) is admitted when a 1-token one would be: never for a blocked account.
        admitted = admits(view.limits.status, left, max(reservation.estimate, 1), mode) is Verdict.ALLOW
        if admitted and reservation.estimate > 0:
            balance.reserved += reservation.estimate
            # Stored under the keys it was reserved for, as reserve.lua does (settle releases from those).
            self._reservations[reservation.request_id] = replace(
                reservation, user_id=user_id, cycle=cycle, plan_id=view.limits.plan_id
            )
        return ReserveResult(admitted=admitted, view=view)

    async def view(self, user_id: str, cycle: str, now: float) -> HotView | None:
        balance = self._balances.get((user_id, cycle))
        if balance is None or balance.stale(now):
            return None
        return balance.view()

    async def load(self, snapshot: LedgerSnapshot) -> None:
        self._apply(snapshot)

    def _apply(self, snapshot: LedgerSnapshot) -> None:
        key = (snapshot.user_id, snapshot.cycle)
        balance = self._balances.get(key)
        if balance is None:
            self._balances[key] = _HotBalance(snapshot)
        elif balance.snapshot.version <= snapshot.version:  # an equal version is written again
            balance.snapshot = snapshot

    async def peek_reservation(self, request_id: str) -> Reservation | None:
        return self._reservations.get(request_id)

    async def mark_settling(self, request_id: str, cost: int) -> bool:
        reservation = self._reservations.get(request_id)
        if reservation is None or request_id in self._settling:
            return False
        self._settling[request_id] = cost
        balance = self._balances.get((reservation.user_id, reservation.cycle))
        if balance is not None:
            balance.reserved = max(0, balance.reserved - reservation.estimate)
            balance.settling += cost
        return True

    async def mark_forwarded(self, request_id: str) -> bool:
        reservation = self._reservations.get(request_id)
        if reservation is None:
            return False
        self._reservations[request_id] = replace(reservation, forwarded=True)
        return True

    async def settle(self, request_id: str, snapshot: LedgerSnapshot | None) -> Reservation | None:
        reservation = self._reservations.pop(request_id, None)
        settling = self._settling.pop(request_id, None)
        if reservation is not None:
            balance = self._balances.get((reservation.user_id, reservation.cycle))
            if balance is not None and settling is not None:
                balance.settling = max(0, balance.settling - settling)
            elif balance is not None:
                balance.reserved = max(0, balance.reserved - reservation.estimate)
        if snapshot is not None:
            self._apply(snapshot)
        return reservation

    async def due_reservations(self, now: float, limit: int) -> list[str]:
        # Redis's sorted set: by expiry, then by request id. As ZRANGEBYSCORE ... LIMIT 0 n: n = 0 returns
        # nothing, a negative n everything.
        due = sorted((r.expires_at, r.request_id) for r in self._reservations.values() if r.expires_at <= now)
        return [request_id for _, request_id in (due if limit < 0 else due[:limit])]

    async def forget(self, user_id: str, cycle: str) -> None:
        self._balances.pop((user_id, cycle), None)


# -- ledger -------------------------------------------------------------------------------------------------


@dataclass
class _Account:
    record: AccountRecord
    version: int = 0


@dataclass
class _Grant:
    id: int
    user_id: str
    amount: int
    remaining: int
    reason: str
    source: str
    expires_at: datetime | None
    created_by: str
    created_at: datetime

    def open_at(self, now: datetime) -> bool:
        return self.remaining > 0 and (self.expires_at is None or self.expires_at > now)


@dataclass
class _CycleRow:
    allowance_used: int = 0
    tokens_charged: int = 0
    requests: int = 0


class MemoryLedger:
    """The Ledger port in dicts, with the rows PostgresLedger keeps (usage events, ledger entries, audit)."""

    def __init__(self, limits_of: LimitsOf) -> None:
        self._limits_of = limits_of
        self._accounts: dict[str, _Account] = {}
        self._cycles: dict[tuple[str, str], _CycleRow] = {}
        self._grants: list[_Grant] = []
        self._usage: dict[str, dict[str, Any]] = {}
        self._entries: list[dict[str, Any]] = []
        self._audit: list[dict[str, Any]] = []
        # One sequence per table, as bigserial.
        self._grant_ids = itertools.count(1)
        self._entry_ids = itertools.count(1)
        self._audit_ids = itertools.count(1)

    async def ensure_account(self, account: NewAccount, plan_id: str) -> AccountRecord:
        existing = self._accounts.get(account.user_id)
        if existing is not None:
            return existing.record
        record = AccountRecord(
            user_id=account.user_id,
            email=account.email,
            name=account.name,
            plan_id=plan_id,
            status=AccountStatus.ACTIVE,
            status_reason="",
            allowance_override=None,
            warn_threshold=None,
            critical_threshold=None,
            created_at=_db_now(),
        )
        self._accounts[account.user_id] = _Account(record)
        self._write_audit(
            "quotagate",
            "account.create",
            account.user_id,
            None,
            {"plan": plan_id, "status": record.status.value, "email": account.email, "name": account.name},
            "",
        )
        return record

    async def get_account(self, user_id: str) -> AccountRecord | None:
        account = self._accounts.get(user_id)
        return None if account is None else account.record

    async def snapshot(self, user_id: str, cycle: str, now: datetime) -> LedgerSnapshot:
        return self._snapshot(user_id, cycle, now)

    def _account(self, user_id: str) -> _Account:
        account = self._accounts.get(user_id)
        if account is None:
            raise NotFound(f"no account {user_id!r}")
        return account

    def _open_grants(self, user_id: str, now: datetime) -> list[_Grant]:
        return [g for g in self._grants if g.user_id == user_id and g.open_at(now)]

    def _snapshot(self, user_id: str, cycle: str, now: datetime) -> LedgerSnapshot:
        account = self._account(user_id)
        row = self._cycles.get((user_id, cycle))
        grants = self._open_grants(user_id, now)
        expiries = [g.expires_at for g in grants if g.expires_at is not None]
        return LedgerSnapshot(
            user_id=user_id,
            cycle=cycle,
            limits=self._limits_of(account.record),
            allowance_used=row.allowance_used if row else 0,
            credits=sum(g.remaining for g in grants),
            next_credit_expiry=min(expiries) if expiries else None,
            version=account.version,
        )

    async def record_usage(self, usage: UsageRecord, cycle: str, now: datetime) -> tuple[SettleOutcome, LedgerSnapshot]:
        account = self._account(usage.user_id)
        first = self._usage.get(usage.request_id)
        if first is not None:
            outcome = SettleOutcome(charged=False, cost=first["cost"], user_id=first["user_id"])
            return outcome, self._snapshot(first["user_id"], cycle, now)
        cost = usage.cost if usage.succeeded else 0
        self._usage[usage.request_id] = {
            "request_id": usage.request_id,
            "user_id": usage.user_id,
            "model": usage.model,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": cost,
            "cycle": cycle,
            "status": "succeeded" if usage.succeeded else "failed",
            "estimated": usage.estimated,
            "source": usage.source,
            "occurred_at": _utc(usage.occurred_at),
            "recorded_at": _db_now(),
        }
        if usage.succeeded and usage.cost > 0:
            self._charge(account, usage, cycle, now)
        return SettleOutcome(charged=usage.succeeded, cost=cost, user_id=usage.user_id), self._snapshot(
            usage.user_id, cycle, now
        )

    def _charge(self, account: _Account, usage: UsageRecord, cycle: str, now: datetime) -> None:
        limits = self._limits_of(account.record)
        row = self._cycles.setdefault((usage.user_id, cycle), _CycleRow())
        grants = {g.id: g for g in self._open_grants(usage.user_id, now)}
        split = split_charge(
            usage.cost,
            limits.allowance,
            row.allowance_used,
            [OpenGrant(g.id, g.remaining, g.expires_at, g.created_at) for g in grants.values()],
            now,
        )
        for draw in split.credits:
            grants[draw.grant_id].remaining -= draw.amount
        row.allowance_used = allowance_used_after(row.allowance_used, split)
        row.tokens_charged += usage.cost
        row.requests += 1
        reason = f"{usage.model or 'unknown model'}: {'estimated' if usage.estimated else 'reported'} by "
        reason += usage.source or "api"
        draws: list[tuple[str, int, int | None]] = []
        if split.allowance:
            draws.append(("allowance", -split.allowance, None))
        draws.extend(("credit", -d.amount, d.grant_id) for d in split.credits)
        if split.overdraft:
            draws.append(("overdraft", -split.overdraft, None))
        for draws_from, amount, grant_id in draws:
            self._write_entry(usage.user_id, cycle, "usage", draws_from, amount, grant_id, usage.request_id, reason, "")
        account.version += 1

    async def grant(self, grant: NewGrant, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        grant.validate(now)
        account = self._account(grant.user_id)
        before = self._snapshot(grant.user_id, cycle, now)
        stored = _Grant(
            id=next(self._grant_ids),
            user_id=grant.user_id,
            amount=grant.amount,
            remaining=grant.amount,
            reason=grant.reason,
            source=grant.source,
            expires_at=None if grant.expires_at is None else _utc(grant.expires_at),
            created_by=grant.actor,
            created_at=_db_now(),
        )
        self._grants.append(stored)
        self._write_entry(
            grant.user_id, cycle, "grant", "grant", grant.amount, stored.id, None, grant.reason, grant.actor
        )
        account.version += 1
        after = self._snapshot(grant.user_id, cycle, now)
        self._write_audit(
            grant.actor,
            "credits.grant",
            grant.user_id,
            {"credits": before.credits},
            {
                "credits": after.credits,
                "grant_id": stored.id,
                "amount": grant.amount,
                "source": grant.source,
                "expires_at": stored.expires_at.isoformat() if stored.expires_at else None,
            },
            grant.reason,
        )
        return stored.id, after

    async def upsert_account(
        self,
        user_id: str,
        changes: AccountChanges,
        default_plan: str,
        reason: str,
        actor: str,
        cycle: str,
        now: datetime,
    ) -> LedgerSnapshot:
        existing = self._accounts.get(user_id)
        if existing is None:
            await self.ensure_account(NewAccount(user_id), changes.plan_id or default_plan)
            existing = self._accounts[user_id]
            before: dict[str, object] | None = None
        else:
            before = account_fields(existing.record)
        existing.record = changes.apply(existing.record)
        existing.version += 1
        self._write_audit(actor, "account.upsert", user_id, before, account_fields(existing.record), reason)
        return self._snapshot(user_id, cycle, now)

    async def set_status(
        self, user_id: str, status: AccountStatus, reason: str, actor: str, cycle: str, now: datetime
    ) -> LedgerSnapshot:
        account = self._account(user_id)
        before = account.record.status
        account.record = replace(account.record, status=status, status_reason=reason)
        account.version += 1
        self._write_audit(
            actor,
            f"account.{'suspend' if status is AccountStatus.SUSPENDED else 'activate'}",
            user_id,
            {"status": before.value},
            {"status": status.value},
            reason,
        )
        return self._snapshot(user_id, cycle, now)

    async def adjust(self, adjustment: Adjustment, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        if adjustment.amount <= 0:
            raise InvalidRequest("amount must be positive")
        account = self._account(adjustment.user_id)
        before = self._snapshot(adjustment.user_id, cycle, now)
        grants = {g.id: g for g in self._open_grants(adjustment.user_id, now)}
        rest = adjustment.amount
        draws: list[tuple[int, int]] = []
        for grant in spend_order(
            [OpenGrant(g.id, g.remaining, g.expires_at, g.created_at) for g in grants.values()], now
        ):
            if rest == 0:
                break
            take = min(rest, grant.remaining)
            draws.append((grant.id, take))
            rest -= take
        removed = adjustment.amount - rest
        if removed == 0:
            raise InvalidRequest(f"account {adjustment.user_id!r} has no credits to remove")
        for grant_id, take in draws:
            grants[grant_id].remaining -= take
            self._write_entry(
                adjustment.user_id,
                cycle,
                "adjustment",
                "credit",
                -take,
                grant_id,
                None,
                adjustment.reason,
                adjustment.actor,
            )
        account.version += 1
        after = self._snapshot(adjustment.user_id, cycle, now)
        self._write_audit(
            adjustment.actor,
            "credits.adjust",
            adjustment.user_id,
            {"credits": before.credits},
            {"credits": after.credits, "requested": adjustment.amount, "removed": removed},
            adjustment.reason,
        )
        return removed, after

    async def reset_cycle(self, user_id: str, reason: str, actor: str, cycle: str, now: datetime) -> LedgerSnapshot:
        account = self._account(user_id)
        row = self._cycles.setdefault((user_id, cycle), _CycleRow())
        used = row.allowance_used
        row.allowance_used = 0
        self._write_entry(user_id, cycle, "reset", "allowance", used, None, None, reason, actor)
        account.version += 1
        self._write_audit(
            actor,
            "cycle.reset",
            user_id,
            {"cycle": cycle, "allowance_used": used},
            {"cycle": cycle, "allowance_used": 0},
            reason,
        )
        return self._snapshot(user_id, cycle, now)

    async def usage_events(self, user_id: str) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self._usage.values() if r["user_id"] == user_id]
        return sorted(rows, key=lambda r: (r["recorded_at"], r["request_id"]))

    async def audit_entries(self, target: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._audit if r["target"] == target]

    def _write_entry(
        self,
        user_id: str,
        cycle: str,
        kind: str,
        draws_from: str,
        amount: int,
        grant_id: int | None,
        request_id: str | None,
        reason: str,
        actor: str,
    ) -> None:
        self._entries.append(
            {
                "id": next(self._entry_ids),
                "user_id": user_id,
                "cycle": cycle,
                "kind": kind,
                "draws_from": draws_from,
                "amount": amount,
                "grant_id": grant_id,
                "request_id": request_id,
                "reason": reason,
                "actor": actor,
                "created_at": _db_now(),
            }
        )

    def _write_audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        reason: str,
    ) -> None:
        self._audit.append(
            {
                "id": next(self._audit_ids),
                "actor": actor,
                "action": action,
                "target": target,
                "before": None if before is None else _jsonb_text(before),
                "after": None if after is None else _jsonb_text(after),
                "reason": reason,
                "created_at": _db_now(),
            }
        )


def _db_now() -> datetime:
    # Where PostgreSQL fills a column with now() (created_at, recorded_at), so is the wall clock used here.
    return datetime.now(UTC)


def _utc(at: datetime) -> datetime:
    # timestamptz comes back from asyncpg in UTC; a naive value is taken as UTC, as asyncpg does.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _jsonb_text(value: dict[str, Any]) -> str:
    """A flat object as asyncpg returns a jsonb column (text, no codec): keys by byte length, then bytes."""
    keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
    pairs = (f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(value[k], ensure_ascii=False)}" for k in keys)
    return "{" + ", ".join(pairs) + "}"
