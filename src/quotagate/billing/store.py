"""Payments in PostgreSQL, next to the ledger they credit: each balance change and its payment row are one
transaction, under the account's row lock (the same lock every other balance change takes).

A session's row is written once, by `record_open` when quotagate creates the session, with the user, package,
tokens, price and currency quotagate sold. Events only move its status: they never create a session's row and
never change what it says was sold, so the tokens credited and the user credited are always the row's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from quotagate.billing.events import PaymentFailed, Refunded
from quotagate.config import Package
from quotagate.core.notifications import NotificationKind
from quotagate.store.postgres import _audit, _bump_version, _enqueue

__all__ = ["CreditOutcome", "PaymentRecord", "PaymentStore", "RefundOutcome"]

ACTOR = "stripe"
_COLUMNS = """id, session_id, payment_intent, user_id, package_id, tokens, amount, currency, status, grant_id,
    refunded_amount, tokens_removed, failure_message, created_at, updated_at, checkout_ref"""
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
    checkout_ref: str = ""  # quotagate's reference in the session's and PaymentIntent's metadata


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
        checkout_ref=row["checkout_ref"] or "",
    )


@dataclass(frozen=True)
class CreditOutcome:
    payment: PaymentRecord
    granted: bool  # False: this session was credited before (a redelivery or a second reconcile), or refused
    refused: str = ""  # why the event may not credit this row


@dataclass(frozen=True)
class RefundOutcome:
    payment: PaymentRecord
    removed: int  # credit tokens taken back by this event (0 on a redelivery or when all were spent)
    refused: str = ""  # why the event disagrees with the payment row (then nothing was changed)


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

    async def record_open(
        self, session_id: str, payment_intent: str, user_id: str, package: Package, ref: str
    ) -> PaymentRecord:
        """The buyer was sent to this session, which quotagate created for this user and package (its tokens,
        price and currency as configured now); nothing is credited yet."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""INSERT INTO payments (session_id, payment_intent, user_id, package_id, tokens, amount, currency,
                        checkout_ref)
                    VALUES ($1, nullif($2, ''), $3, $4, $5, $6, $7, $8)
                    RETURNING {_COLUMNS}""",
                session_id,
                payment_intent,
                user_id,
                package.id,
                package.tokens,
                package.price,
                package.currency,
                ref,
            )
        return _record(row)

    async def credit(
        self, payment: PaymentRecord, payment_intent: str, reason: str, cycle: str, now: datetime, event_id: str
    ) -> CreditOutcome:
        """Grants the row's tokens to the row's user with source `stripe` and the session id, at most once.

        `payment_intent` is the one the paid session names; refunds find the purchase by it, so it must be the
        row's own (when the row has one) and no other session's."""
        try:
            return await self._credit(payment, payment_intent, reason, cycle, now, event_id)
        except asyncpg.UniqueViolationError:  # another session took this PaymentIntent at the same moment
            return CreditOutcome(payment, False, "its PaymentIntent paid another checkout session")

    async def _credit(
        self, payment: PaymentRecord, payment_intent: str, reason: str, cycle: str, now: datetime, event_id: str
    ) -> CreditOutcome:
        user_id = payment.user_id
        async with self._pool.acquire() as conn, conn.transaction():
            if not await _lock_account(conn, user_id):
                raise LookupError(f"no account {user_id!r}")
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE id = $1 FOR UPDATE", payment.id)
            current = _record(row)
            if current.grant_id is not None:
                return CreditOutcome(current, granted=False)
            if payment_intent:
                if current.payment_intent and current.payment_intent != payment_intent:
                    return CreditOutcome(current, False, "the session's PaymentIntent is not the one recorded")
                other = await conn.fetchval(
                    "SELECT session_id FROM payments WHERE payment_intent = $1 AND session_id IS NOT NULL AND id <> $2",
                    payment_intent,
                    current.id,
                )
                if other is not None:
                    return CreditOutcome(current, False, "its PaymentIntent paid another checkout session")
            before = await _credits(conn, user_id, now)
            grant_id: int = await conn.fetchval(
                """INSERT INTO credit_grants (user_id, amount, remaining, reason, source, source_ref, created_by)
                   VALUES ($1, $2, $2, $3, 'stripe', $4, $5) RETURNING id""",
                user_id,
                current.tokens,
                reason,
                current.session_id,
                ACTOR,
            )
            await conn.execute(
                """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, reason, actor)
                   VALUES ($1, $2, 'grant', 'grant', $3, $4, $5, $6)""",
                user_id,
                cycle,
                current.tokens,
                grant_id,
                reason,
                ACTOR,
            )
            paid = await conn.fetchrow(
                f"""UPDATE payments SET payment_intent = coalesce(nullif($2, ''), payment_intent), status = 'paid',
                        grant_id = $3, last_event_id = $4, updated_at = now()
                    WHERE id = $1 RETURNING {_COLUMNS}""",
                current.id,
                payment_intent,
                grant_id,
                event_id,
            )
            await _bump_version(conn, user_id)
            if self._notifications:
                await _enqueue(conn, user_id, cycle, NotificationKind.CREDITS, current.tokens, self._outbox_statuses)
            await _audit(
                conn,
                ACTOR,
                "credits.grant",
                user_id,
                {"credits": before},
                {
                    "credits": before + current.tokens,
                    "grant_id": grant_id,
                    "amount": current.tokens,
                    "source": "stripe",
                    "session_id": current.session_id,
                    "package_id": current.package_id,
                    "paid": {"amount": current.amount, "currency": current.currency},
                },
                reason,
            )
        return CreditOutcome(_record(paid), granted=True)

    async def mark_unpaid(self, payment: PaymentRecord, status: str, event_id: str) -> PaymentRecord:
        """A session that finished without (yet) being paid: its status noted, nothing granted. A credited
        session keeps its status."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""UPDATE payments SET status = CASE WHEN grant_id IS NULL THEN $2 ELSE status END,
                        last_event_id = $3, updated_at = now()
                    WHERE id = $1 RETURNING {_COLUMNS}""",
                payment.id,
                status,
                event_id,
            )
        return _record(row)

    async def checkout_of(self, ref: str, payment_intent: str) -> PaymentRecord | None:
        """The checkout session quotagate created with this reference, else the one this PaymentIntent paid."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""SELECT {_COLUMNS} FROM payments
                    WHERE session_id IS NOT NULL
                      AND ((checkout_ref = $1 AND $1 <> '') OR (payment_intent = $2 AND $2 <> ''))
                    ORDER BY (checkout_ref = $1 AND $1 <> '') DESC LIMIT 1""",
                ref,
                payment_intent,
            )
        return None if row is None else _record(row)

    async def record_failure(
        self, failure: PaymentFailed, checkout: PaymentRecord, cycle: str, event_id: str
    ) -> PaymentRecord | None:
        """A declined card attempt at quotagate's `checkout`, recorded once per PaymentIntent with the checkout's
        user, package, tokens and price; the user is notified the first time. None: recorded before."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO payments (payment_intent, user_id, package_id, tokens, amount, currency, status,
                        failure_message, last_event_id)
                    VALUES ($1, $2, $3, $4, $5, $6, 'failed', $7, $8)
                    ON CONFLICT (payment_intent) WHERE session_id IS NULL DO NOTHING
                    RETURNING {_COLUMNS}""",
                failure.payment_intent,
                checkout.user_id,
                checkout.package_id,
                checkout.tokens,
                checkout.amount,
                checkout.currency,
                failure.message[:500],
                event_id,
            )
            if row is None:
                return None
            known = await conn.fetchval("SELECT true FROM accounts WHERE user_id = $1", checkout.user_id)
            if known and self._notifications:
                await _enqueue(
                    conn, checkout.user_id, cycle, NotificationKind.PAYMENT_FAILED, checkout.tokens,
                    self._outbox_statuses,
                )  # fmt: skip
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
            refused = _refund_refusal(refund, payment)
            if refused:
                return RefundOutcome(payment, removed=0, refused=refused)
            if refund.amount_refunded <= payment.refunded_amount:
                return RefundOutcome(payment, removed=0)
            paid = payment.amount
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


def _refund_refusal(refund: Refunded, payment: PaymentRecord) -> str:
    """Why a refund event disagrees with the purchase it names, or "": the charge is the purchase's (its amount
    and currency) and the running total refunded lies within what was paid."""
    if refund.currency and refund.currency != payment.currency:
        return f"the charge is in {refund.currency[:8]!r}, the purchase in {payment.currency!r}"
    if refund.amount != payment.amount:
        return f"the charge's amount is not the purchase's {payment.amount}"
    if not 0 <= refund.amount_refunded <= payment.amount:
        return f"the amount refunded is not between 0 and the {payment.amount} paid"
    return ""


def _tokens_for(tokens: int, refunded: int, paid: int) -> int:
    """The tokens a refund of `refunded` out of `paid` takes back, proportionally (all of them at a full refund)."""
    if paid <= 0 or refunded >= paid:
        return tokens if refunded > 0 else 0
    return tokens * refunded // paid
