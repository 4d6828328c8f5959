"""Payments in PostgreSQL, next to the ledger they credit: each balance change and its payment row are one
transaction, under the account's row lock (the same lock every other balance change takes)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from quotagate.billing.events import CheckoutSession, PaymentFailed, Refunded
from quotagate.core.notifications import NotificationKind
from quotagate.store.postgres import _audit, _bump_version, _enqueue

__all__ = ["CreditOutcome", "PaymentRecord", "PaymentStore", "RefundOutcome"]

ACTOR = "stripe"
_COLUMNS = """id, session_id, payment_intent, user_id, package_id, tokens, amount, currency, status, grant_id,
    refunded_amount, tokens_removed, failure_message, created_at, updated_at"""
STATUSES = ("open", "paid", "unpaid", "failed", "expired", "refunded", "partially_refunded")


@dataclass(frozen=True)
class PaymentRecord:
    id: int
    session_id: str
    payment_intent: str
    user_id: str
    package_id: str
    tokens: int
    amount: int
    currency: str
    status: str
    grant_id: int | None
    refunded_amount: int
    tokens_removed: int
    failure_message: str
    created_at: datetime
    updated_at: datetime


def _record(row: asyncpg.Record) -> PaymentRecord:
    return PaymentRecord(
        id=row["id"],
        session_id=row["session_id"] or "",
        payment_intent=row["payment_intent"] or "",
        user_id=row["user_id"],
        package_id=row["package_id"],
        tokens=row["tokens"],
        amount=row["amount"],
        currency=row["currency"],
        status=row["status"],
        grant_id=row["grant_id"],
        refunded_amount=row["refunded_amount"],
        tokens_removed=row["tokens_removed"],
        failure_message=row["failure_message"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True)
class CreditOutcome:
    payment: PaymentRecord
    granted: bool  # False: this session was credited before (a redelivery or a second reconcile)


@dataclass(frozen=True)
class RefundOutcome:
    payment: PaymentRecord
    removed: int  # credit tokens taken back by this event (0 on a redelivery or when all were spent)


async def _credits(conn: asyncpg.Connection, user_id: str, now: datetime) -> int:
    value = await conn.fetchval(
        """SELECT coalesce(sum(remaining), 0)::bigint FROM credit_grants
           WHERE user_id = $1 AND remaining > 0 AND (expires_at IS NULL OR expires_at > $2)""",
        user_id,
        now,
    )
    return int(value)


async def _lock_account(conn: asyncpg.Connection, user_id: str) -> bool:
    return bool(await conn.fetchval("SELECT true FROM accounts WHERE user_id = $1 FOR UPDATE", user_id))


class PaymentStore:
    def __init__(
        self, pool: asyncpg.Pool, notifications: bool, outbox_statuses: tuple[str, str] = ("pending", "none")
    ) -> None:
        self._pool = pool
        # Whether balance changes enqueue customer e-mails (as the ledger does when notifications are on).
        self._notifications = notifications
        self._outbox_statuses = outbox_statuses

    async def record_open(self, session: CheckoutSession, tokens: int) -> PaymentRecord:
        """The buyer was sent to this session; nothing is credited yet."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""INSERT INTO payments (session_id, payment_intent, user_id, package_id, tokens, amount, currency)
                    VALUES ($1, nullif($2, ''), $3, $4, $5, $6, $7)
                    ON CONFLICT (session_id) DO UPDATE SET updated_at = payments.updated_at
                    RETURNING {_COLUMNS}""",
                session.id,
                session.payment_intent,
                session.user_id,
                session.package_id,
                tokens,
                session.amount_total,
                session.currency,
            )
        return _record(row)

    async def credit(
        self, session: CheckoutSession, reason: str, cycle: str, now: datetime, event_id: str
    ) -> CreditOutcome:
        """Grants a paid session's tokens with source `stripe` and the session id, at most once."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await _lock_account(conn, session.user_id):
                raise LookupError(f"no account {session.user_id!r}")
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE session_id = $1 FOR UPDATE", session.id)
            if row is not None and row["grant_id"] is not None:
                return CreditOutcome(_record(row), granted=False)
            before = await _credits(conn, session.user_id, now)
            grant_id: int = await conn.fetchval(
                """INSERT INTO credit_grants (user_id, amount, remaining, reason, source, source_ref, created_by)
                   VALUES ($1, $2, $2, $3, 'stripe', $4, $5) RETURNING id""",
                session.user_id,
                session.tokens,
                reason,
                session.id,
                ACTOR,
            )
            await conn.execute(
                """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, reason, actor)
                   VALUES ($1, $2, 'grant', 'grant', $3, $4, $5, $6)""",
                session.user_id,
                cycle,
                session.tokens,
                grant_id,
                reason,
                ACTOR,
            )
            paid = await conn.fetchrow(
                f"""INSERT INTO payments (session_id, payment_intent, user_id, package_id, tokens, amount, currency,
                        status, grant_id, last_event_id)
                    VALUES ($1, nullif($2, ''), $3, $4, $5, $6, $7, 'paid', $8, $9)
                    ON CONFLICT (session_id) DO UPDATE SET
                        payment_intent = coalesce(excluded.payment_intent, payments.payment_intent),
                        user_id = excluded.user_id, package_id = excluded.package_id, tokens = excluded.tokens,
                        amount = excluded.amount, currency = excluded.currency, status = 'paid',
                        grant_id = excluded.grant_id, last_event_id = excluded.last_event_id, updated_at = now()
                    RETURNING {_COLUMNS}""",
                session.id,
                session.payment_intent,
                session.user_id,
                session.package_id,
                session.tokens,
                session.amount_total,
                session.currency,
                grant_id,
                event_id,
            )
            await _bump_version(conn, session.user_id)
            if self._notifications:
                await _enqueue(
                    conn, session.user_id, cycle, NotificationKind.CREDITS, session.tokens, self._outbox_statuses
                )
            await _audit(
                conn,
                ACTOR,
                "credits.grant",
                session.user_id,
                {"credits": before},
                {
                    "credits": before + session.tokens,
                    "grant_id": grant_id,
                    "amount": session.tokens,
                    "source": "stripe",
                    "session_id": session.id,
                    "package_id": session.package_id,
                    "paid": {"amount": session.amount_total, "currency": session.currency},
                },
                reason,
            )
        return CreditOutcome(_record(paid), granted=True)

    async def mark_unpaid(self, session: CheckoutSession, status: str, event_id: str) -> PaymentRecord:
        """A session that finished without (yet) being paid: recorded, nothing granted."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""INSERT INTO payments (session_id, payment_intent, user_id, package_id, tokens, amount, currency,
                        status, last_event_id)
                    VALUES ($1, nullif($2, ''), $3, $4, $5, $6, $7, $8, $9)
                    ON CONFLICT (session_id) DO UPDATE SET
                        payment_intent = coalesce(excluded.payment_intent, payments.payment_intent),
                        status = CASE WHEN payments.grant_id IS NULL THEN excluded.status ELSE payments.status END,
                        last_event_id = excluded.last_event_id, updated_at = now()
                    RETURNING {_COLUMNS}""",
                session.id,
                session.payment_intent,
                session.user_id,
                session.package_id,
                session.tokens,
                session.amount_total,
                session.currency,
                status,
                event_id,
            )
        return _record(row)

    async def record_failure(self, failure: PaymentFailed, cycle: str, event_id: str) -> PaymentRecord | None:
        """A declined card attempt, recorded once per PaymentIntent; the user is notified the first time.
        None: this failure was recorded before."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO payments (payment_intent, user_id, package_id, tokens, amount, currency, status,
                        failure_message, last_event_id)
                    VALUES ($1, $2, $3, $4, $5, $6, 'failed', $7, $8)
                    ON CONFLICT (payment_intent) WHERE session_id IS NULL DO NOTHING
                    RETURNING {_COLUMNS}""",
                failure.payment_intent,
                failure.user_id,
                failure.package_id,
                failure.tokens,
                failure.amount,
                failure.currency,
                failure.message[:500],
                event_id,
            )
            if row is None:
                return None
            known = await conn.fetchval("SELECT true FROM accounts WHERE user_id = $1", failure.user_id)
            if known and self._notifications:
                await _enqueue(
                    conn, failure.user_id, cycle, NotificationKind.PAYMENT_FAILED, failure.tokens, self._outbox_statuses
                )
        return _record(row)

    async def refund(self, refund: Refunded, cycle: str, now: datetime, event_id: str) -> RefundOutcome | None:
        """Takes back the refunded share of a purchase's tokens, as far as they are unspent.

        Stripe reports the running total refunded, so a redelivered event (same total) removes nothing more.
        None: no credited payment has this PaymentIntent."""
        async with self._pool.acquire() as conn, conn.transaction():
            user_id = await conn.fetchval(
                """SELECT user_id FROM payments
                   WHERE payment_intent = $1 AND session_id IS NOT NULL AND grant_id IS NOT NULL""",
                refund.payment_intent,
            )
            if user_id is None:
                return None
            await _lock_account(conn, user_id)
            row = await conn.fetchrow(
                f"""SELECT {_COLUMNS} FROM payments
                    WHERE payment_intent = $1 AND session_id IS NOT NULL AND grant_id IS NOT NULL FOR UPDATE""",
                refund.payment_intent,
            )
            payment = _record(row)
            if refund.amount_refunded <= payment.refunded_amount:
                return RefundOutcome(payment, removed=0)
            paid = payment.amount or refund.amount
            due = _tokens_for(payment.tokens, refund.amount_refunded, paid) - _tokens_for(
                payment.tokens, payment.refunded_amount, paid
            )
            remaining = await conn.fetchval(
                "SELECT remaining FROM credit_grants WHERE id = $1 FOR UPDATE", payment.grant_id
            )
            removed = min(due, int(remaining))
            before = await _credits(conn, user_id, now)
            reason = (
                f"Stripe refund of {refund.amount_refunded} of {paid} {payment.currency.upper()} "
                f"(session {payment.session_id}, charge {refund.charge_id})"
            )
            if removed > 0:
                await conn.execute(
                    "UPDATE credit_grants SET remaining = remaining - $2 WHERE id = $1", payment.grant_id, removed
                )
                await conn.execute(
                    """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, reason, actor)
                       VALUES ($1, $2, 'adjustment', 'credit', $3, $4, $5, $6)""",
                    user_id,
                    cycle,
                    -removed,
                    payment.grant_id,
                    reason,
                    ACTOR,
                )
                await _bump_version(conn, user_id)
            fully = refund.amount_refunded >= paid
            row = await conn.fetchrow(
                f"""UPDATE payments SET refunded_amount = $2, tokens_removed = tokens_removed + $3, status = $4,
                        last_event_id = $5, updated_at = now()
                    WHERE id = $1 RETURNING {_COLUMNS}""",
                payment.id,
                refund.amount_refunded,
                removed,
                "refunded" if fully else "partially_refunded",
                event_id,
            )
            await _audit(
                conn,
                ACTOR,
                "credits.adjust",
                user_id,
                {"credits": before},
                {
                    "credits": before - removed,
                    "requested": due,
                    "removed": removed,
                    "grant_id": payment.grant_id,
                    "session_id": payment.session_id,
                    "refunded": {"amount": refund.amount_refunded, "of": paid, "currency": payment.currency},
                },
                reason,
            )
        return RefundOutcome(_record(row), removed=removed)

    async def get(self, session_id: str) -> PaymentRecord | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE session_id = $1", session_id)
        return None if row is None else _record(row)

    async def search(
        self,
        user_id: str,
        status: str,
        session_id: str,
        start: datetime | None,
        end: datetime | None,
        before_id: int,
        limit: int,
    ) -> list[PaymentRecord]:
        """Payments, newest first, filtered by whatever is given."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_COLUMNS} FROM payments
                    WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR status = $2) AND ($3 = '' OR session_id = $3)
                      AND ($4::timestamptz IS NULL OR created_at >= $4)
                      AND ($5::timestamptz IS NULL OR created_at < $5)
                      AND ($6 = 0 OR id < $6)
                    ORDER BY id DESC LIMIT $7""",
                user_id,
                status,
                session_id,
                start,
                end,
                before_id,
                limit,
            )
        return [_record(r) for r in rows]


def _tokens_for(tokens: int, refunded: int, paid: int) -> int:
    """The tokens a refund of `refunded` out of `paid` takes back, proportionally (all of them at a full refund)."""
    if paid <= 0 or refunded >= paid:
        return tokens if refunded > 0 else 0
    return tokens * refunded // paid
