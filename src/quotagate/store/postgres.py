"""The ledger of record in PostgreSQL (asyncpg). Every write is one transaction."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import asyncpg

from quotagate.core.charge import OpenGrant, allowance_used_after, spend_order, split_charge
from quotagate.core.errors import InvalidRequest, NotFound, StoreUnavailable
from quotagate.core.model import AccountStatus, LedgerSnapshot, ModelWeight, Plan
from quotagate.core.notifications import NotificationKind, crossed, usage_state
from quotagate.core.plans import PlanChanges, plan_fields, validate_plan
from quotagate.store.ports import (
    AccountChanges,
    AccountPage,
    AccountRecord,
    Adjustment,
    ClientKeyRecord,
    LimitsOf,
    NewAccount,
    NewGrant,
    PlanRecord,
    SettleOutcome,
    UsageRecord,
    UsageTotals,
    account_fields,
)

_ACCOUNT_COLUMNS = """a.user_id, a.email, a.name, a.plan_id, a.status, a.status_reason, a.allowance_override,
    a.warn_threshold, a.critical_threshold, a.created_at"""

# An account with its settled position: $2 is the cycle, $3 the time credits are valued at.
_SNAPSHOT_COLUMNS = f"""{_ACCOUNT_COLUMNS}, a.version,
    coalesce(ac.allowance_used, 0) AS allowance_used,
    coalesce((SELECT sum(g.remaining) FROM credit_grants g
              WHERE g.user_id = a.user_id AND g.remaining > 0
                AND (g.expires_at IS NULL OR g.expires_at > $3)), 0)::bigint AS credits,
    (SELECT min(g.expires_at) FROM credit_grants g
      WHERE g.user_id = a.user_id AND g.remaining > 0 AND g.expires_at > $3) AS next_expiry"""

# What a settlement reads, in one statement: the account and its version, the cycle's allowance used (NULL: no
# row yet), whether the previous cycle charged anything (for "renewed"), the open grants as parallel arrays and
# the usage event of the request id, if there is one. $1 user, $2 cycle, $3 now, $4 request id, $5 whether
# notifications are on, $6 the previous cycle.
_SETTLE_READ = f"""SELECT {_ACCOUNT_COLUMNS}, a.version,
        (SELECT ac.allowance_used FROM account_cycles ac WHERE ac.user_id = a.user_id AND ac.cycle = $2)
            AS allowance_used,
        $5::boolean AND EXISTS (SELECT 1 FROM account_cycles p
                                WHERE p.user_id = a.user_id AND p.cycle = $6 AND p.tokens_charged > 0) AS renewed,
        g.grant_ids, g.remaining, g.expires_at, g.granted_at,
        e.user_id AS first_user_id, e.cost AS first_cost
    FROM accounts a
    CROSS JOIN LATERAL (
        SELECT array_agg(cg.id) AS grant_ids, array_agg(cg.remaining) AS remaining,
               array_agg(cg.expires_at) AS expires_at, array_agg(cg.created_at) AS granted_at
        FROM credit_grants cg
        WHERE cg.user_id = a.user_id AND cg.remaining > 0 AND (cg.expires_at IS NULL OR cg.expires_at > $3)) g
    LEFT JOIN usage_events e ON e.request_id = $4
    WHERE a.user_id = $1"""

# All the writes of a settlement in one statement. `locked` takes the account's row lock and is empty unless
# the version ($2) is still the one the split was computed from; the usage event is inserted only under that
# lock (the order every other writer takes), and the rest only if the event is new and $13 says it charges:
# grant draws ($14 ids, $15 amounts), the cycle's figures ($16 allowance used after), ledger entries ($18-$20, in
# order), notifications ($21 kinds, $22/$23 their statuses), the version bump.
_SETTLE_WRITE = """WITH locked AS (
        SELECT a.user_id FROM accounts a WHERE a.user_id = $1 AND a.version = $2 FOR UPDATE
    ), event AS (
        INSERT INTO usage_events (request_id, user_id, model, prompt_tokens, completion_tokens, cost, cycle, status,
            estimated, source, occurred_at)
        SELECT $3, l.user_id, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM locked l
        ON CONFLICT (request_id) DO NOTHING
        RETURNING user_id
    ), charge AS (
        SELECT user_id FROM event WHERE $13::boolean
    ), draws AS (
        UPDATE credit_grants g SET remaining = g.remaining - d.amount
        FROM charge c, unnest($14::bigint[], $15::bigint[]) AS d (id, amount)
        WHERE g.id = d.id
    ), cycle_row AS (
        INSERT INTO account_cycles AS ac (user_id, cycle, allowance_used, tokens_charged, requests)
        SELECT c.user_id, $8, $16, $7, 1 FROM charge c
        ON CONFLICT (user_id, cycle) DO UPDATE SET allowance_used = excluded.allowance_used,
            tokens_charged = ac.tokens_charged + excluded.tokens_charged, requests = ac.requests + 1
    ), entries AS (
        INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, request_id, reason)
        SELECT c.user_id, $8, 'usage', e.draws_from, e.amount, e.grant_id, $3, $17
        FROM charge c, unnest($18::text[], $19::bigint[], $20::bigint[]) WITH ORDINALITY AS e (draws_from, amount,
            grant_id, n)
        ORDER BY e.n
    ), outbox AS (
        INSERT INTO notifications (user_id, cycle, kind, amount, status, hook_status)
        SELECT c.user_id, $8, k.kind, 0, $22, $23
        FROM charge c, unnest($21::text[]) WITH ORDINALITY AS k (kind, n)
        ORDER BY k.n
        ON CONFLICT (user_id, cycle, kind) DO NOTHING
    ), bumped AS (
        UPDATE accounts a SET version = a.version + 1 FROM charge c WHERE a.user_id = c.user_id
        RETURNING a.version
    )
    SELECT EXISTS (SELECT 1 FROM locked) AS locked, EXISTS (SELECT 1 FROM event) AS inserted,
           (SELECT version FROM bumped) AS version"""

# The columns of a usage export, in order (the CSV header).
EXPORT_COLUMNS = """request_id, user_id, model, prompt_tokens, completion_tokens, cost, cycle, status, estimated,
    source, occurred_at, recorded_at"""

# How long an account whose unlocked settlement lost a race is settled under its row lock from the start.
_CONTENDED_SECONDS = 1.0
# Bounds the accounts remembered as contended (all are forgotten at once past it).
_CONTENDED_MAX = 10_000

# A fixed key for pg_advisory_xact_lock, so two processes never migrate at once.
_MIGRATION_LOCK = 0x71676D6967


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in store/migrations, in order."""
    found = []
    for entry in resources.files("quotagate.store").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Applies the migrations not yet applied; returns their names."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    return applied_now


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing to send.

    asyncpg still rolls back a transaction left open before calling this. Its default reset (SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL) would cost one more round trip on every release,
    to undo session state that nothing on these pools creates: no SET, LISTEN, session-level advisory lock (the
    migration's is transaction-level) or WITH HOLD cursor."""


P = ParamSpec("P")
R = TypeVar("R")

# Losing the server (or never reaching it) is StoreUnavailable; constraint violations and bad SQL are bugs
# and stay what they are.
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


def _store(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
        except asyncpg.DataError as exc:
            # SQLSTATE class 22: a value PostgreSQL cannot store (a NUL in text, a number out of range) is the
            # caller's input, refused as such; the transaction rolled back, so nothing was written.
            raise InvalidRequest(f"value not accepted: {exc}") from exc

    return wrapper


def _account(row: asyncpg.Record) -> AccountRecord:
    return AccountRecord(
        user_id=row["user_id"],
        email=row["email"],
        name=row["name"],
        plan_id=row["plan_id"],
        status=AccountStatus(row["status"]),
        status_reason=row["status_reason"],
        allowance_override=row["allowance_override"],
        warn_threshold=row["warn_threshold"],
        critical_threshold=row["critical_threshold"],
        created_at=row["created_at"],
    )


@dataclass(frozen=True)
class PendingNotification:
    """An outbox row claimed for delivery, with the address it goes to."""

    id: int
    user_id: str
    cycle: str
    kind: NotificationKind
    amount: int
    attempts: int
    email: str
    name: str


@dataclass(frozen=True)
class WebhookEvent:
    """An outbox row claimed for the webhook. event_id stays the same on every attempt."""

    id: int
    event_id: str
    user_id: str
    cycle: str
    kind: NotificationKind
    amount: int
    attempts: int
    created_at: datetime
    email: str
    name: str


class PostgresLedger:
    def __init__(
        self,
        pool: asyncpg.Pool,
        limits_of: LimitsOf,
        notifications: bool = False,
        mail: bool = True,
        webhook: bool = False,
    ) -> None:
        self._pool = pool
        self._limits_of = limits_of
        # Whether balance changes enqueue customer notifications in the outbox (off unless they are enabled),
        # and the delivery status a new row starts with per channel: an unconfigured channel never sends it.
        self._notifications = notifications
        self._outbox_status = ("pending" if mail else "skipped", "pending" if webhook else "none")
        # Accounts whose unlocked settlement lost a race to another change, and when (time.monotonic()).
        self._contended: dict[str, float] = {}

    @property
    def outbox_statuses(self) -> tuple[str, str]:
        """The e-mail and webhook status a new outbox row starts with (for stores that enqueue too)."""
        return self._outbox_status

    @classmethod
    async def connect(
        cls,
        dsn: str,
        limits_of: LimitsOf,
        max_size: int = 10,
        notifications: bool = False,
        mail: bool = True,
        webhook: bool = False,
    ) -> PostgresLedger:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, command_timeout=10, reset=_no_session_state
        )
        return cls(pool, limits_of, notifications, mail, webhook)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    @_store
    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def migrate(self) -> list[str]:
        async with self._pool.acquire() as conn:
            return await migrate(conn)

    async def sync_plans(self, plans: Sequence[Plan]) -> list[str]:
        """Seeds the configured plans that the database does not have yet; returns their ids.

        A plan already in the database is left as it is: from then on the database is its record (changed with
        the Admin API), so an older config file cannot undo a change made there."""
        seeded: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for plan in plans:
                created = await conn.fetchval(
                    """INSERT INTO plans (id, name, monthly_allowance, warn_threshold, critical_threshold,
                           model_weights, active)
                       VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)
                       ON CONFLICT (id) DO NOTHING RETURNING true""",
                    *_plan_args(plan),
                )
                if created:
                    seeded.append(plan.id)
        return seeded

    # -- plans (PlanStore) ---------------------------------------------------------------------------------

    @_store
    async def plans(self, count_accounts: bool = False) -> list[PlanRecord]:
        # The periodic reload of every process skips the counts (one index scan per plan).
        count = "(SELECT count(*) FROM accounts a WHERE a.plan_id = p.id)" if count_accounts else "0"
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_PLAN_COLUMNS}, {count} AS accounts FROM plans p ORDER BY p.id")
        return [_plan_record(r) for r in rows]

    @_store
    async def create_plan(self, plan: Plan, reason: str, actor: str) -> PlanRecord:
        validate_plan(plan)
        async with self._pool.acquire() as conn, conn.transaction():
            created = await conn.fetchval(
                """INSERT INTO plans (id, name, monthly_allowance, warn_threshold, critical_threshold,
                       model_weights, active)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)
                   ON CONFLICT (id) DO NOTHING RETURNING true""",
                *_plan_args(plan),
            )
            if not created:
                raise InvalidRequest(f"a plan {plan.id!r} exists already; change it with UpdatePlan")
            await _audit(conn, actor, "plan.create", f"plan:{plan.id}", None, plan_fields(plan), reason)
            row = await conn.fetchrow(f"SELECT {_PLAN_COLUMNS}, {_PLAN_ACCOUNTS} FROM plans p WHERE p.id = $1", plan.id)
        return _plan_record(row)

    @_store
    async def update_plan(self, plan_id: str, changes: PlanChanges, reason: str, actor: str) -> PlanRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_PLAN_COLUMNS}, {_PLAN_ACCOUNTS} FROM plans p WHERE p.id = $1 FOR UPDATE", plan_id
            )
            if row is None:
                raise NotFound(f"no plan {plan_id!r}")
            before = _plan_record(row).plan
            after = validate_plan(changes.apply(before))
            await conn.execute(
                """UPDATE plans SET name = $2, monthly_allowance = $3, warn_threshold = $4, critical_threshold = $5,
                       model_weights = $6::jsonb, active = $7, updated_at = now() WHERE id = $1""",
                *_plan_args(after),
            )
            await _audit(conn, actor, "plan.update", f"plan:{plan_id}", plan_fields(before), plan_fields(after), reason)
            row = await conn.fetchrow(f"SELECT {_PLAN_COLUMNS}, {_PLAN_ACCOUNTS} FROM plans p WHERE p.id = $1", plan_id)
        return _plan_record(row)

    @_store
    async def ensure_account(self, account: NewAccount, plan_id: str) -> AccountRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO accounts AS a (user_id, email, name, plan_id) VALUES ($1, $2, $3, $4)
                    ON CONFLICT (user_id) DO NOTHING RETURNING {_ACCOUNT_COLUMNS}""",
                account.user_id,
                account.email,
                account.name,
                plan_id,
            )
            if row is not None:
                await _audit(conn, "quotagate", "account.create", account.user_id, None, _account_json(row), "")
                return _account(row)
            existing = await conn.fetchrow(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.user_id = $1", account.user_id
            )
            return _account(existing)

    @_store
    async def get_account(self, user_id: str) -> AccountRecord | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.user_id = $1", user_id)
        return None if row is None else _account(row)

    @_store
    async def snapshot(self, user_id: str, cycle: str, now: datetime) -> LedgerSnapshot:
        async with self._pool.acquire() as conn:
            return await self._snapshot(conn, user_id, cycle, now)

    async def _snapshot(self, conn: asyncpg.Connection, user_id: str, cycle: str, now: datetime) -> LedgerSnapshot:
        row = await conn.fetchrow(
            f"""SELECT {_SNAPSHOT_COLUMNS}
                FROM accounts a
                LEFT JOIN account_cycles ac ON ac.user_id = a.user_id AND ac.cycle = $2
                WHERE a.user_id = $1""",
            user_id,
            cycle,
            now,
        )
        if row is None:
            raise NotFound(f"no account {user_id!r}")
        return self._snapshot_of(row, cycle)

    def _snapshot_of(self, row: asyncpg.Record, cycle: str) -> LedgerSnapshot:
        return LedgerSnapshot(
            user_id=row["user_id"],
            cycle=cycle,
            limits=self._limits_of(_account(row)),
            allowance_used=row["allowance_used"],
            credits=row["credits"],
            next_credit_expiry=row["next_expiry"],
            version=row["version"],
        )

    async def _lock_account(self, conn: asyncpg.Connection, user_id: str) -> AccountRecord:
        # The row lock serialises every balance change of one account, so grant draws never race.
        row = await conn.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.user_id = $1 FOR UPDATE", user_id)
        if row is None:
            raise NotFound(f"no account {user_id!r}")
        return _account(row)

    @_store
    async def record_usage(self, usage: UsageRecord, cycle: str, now: datetime) -> tuple[SettleOutcome, LedgerSnapshot]:
        async with self._pool.acquire() as conn:
            # Two round trips and no BEGIN/COMMIT: the read is not locked, and the write takes the account's row
            # lock first and goes ahead only if the account's version is still the one read. Every balance change
            # bumps the version under that lock, so nothing computed from the read can be stale.
            settled = None
            if not self._contended_lately(usage.user_id):
                settled = await self._settle(conn, usage, cycle, now)
                if settled is None:
                    if len(self._contended) >= _CONTENDED_MAX:
                        self._contended.clear()
                    self._contended[usage.user_id] = time.monotonic()
            if settled is None:
                # Another change of this account came in between (or did lately): settle holding the row lock from
                # before the read, as the other balance changes do, which nothing can overtake.
                async with conn.transaction():
                    await self._lock_account(conn, usage.user_id)
                    settled = await self._settle(conn, usage, cycle, now)
            if settled is None:
                raise RuntimeError(f"account {usage.user_id!r} changed under its own row lock")
            return settled

    def _contended_lately(self, user_id: str) -> bool:
        """Whether an unlocked settlement of this account lost a race in the last _CONTENDED_SECONDS: one that
        races again would most likely lose again, after waiting for the lock in vain."""
        since = self._contended.get(user_id)
        if since is None:
            return False
        if time.monotonic() - since < _CONTENDED_SECONDS:
            return True
        del self._contended[user_id]
        return False

    async def _settle(
        self, conn: asyncpg.Connection, usage: UsageRecord, cycle: str, now: datetime
    ) -> tuple[SettleOutcome, LedgerSnapshot] | None:
        """One settlement from one read and one write; None when the account changed in between (nothing written).

        The split stays in Python (core.charge); the SQL only reads its inputs and writes its result."""
        row = await conn.fetchrow(
            _SETTLE_READ,
            usage.user_id,
            cycle,
            now,
            usage.request_id,
            self._notifications,
            previous_cycle(cycle),
        )
        if row is None:
            raise NotFound(f"no account {usage.user_id!r}")
        limits = self._limits_of(_account(row))
        grants = [
            OpenGrant(grant_id, remaining, expires_at, created_at)
            for grant_id, remaining, expires_at, created_at in zip(
                row["grant_ids"] or [], row["remaining"] or [], row["expires_at"] or [], row["granted_at"] or [],
                strict=True,
            )
        ]  # fmt: skip
        used: int | None = row["allowance_used"]
        current = LedgerSnapshot(
            user_id=usage.user_id,
            cycle=cycle,
            limits=limits,
            allowance_used=used or 0,
            credits=sum(g.remaining for g in grants),
            next_credit_expiry=_next_expiry(grants),
            version=row["version"],
        )
        if row["first_user_id"] is not None:
            return await self._repeat(conn, row["first_user_id"], row["first_cost"], current, cycle, now)

        charge = usage.succeeded and usage.cost > 0
        split = split_charge(usage.cost if charge else 0, limits.allowance, used or 0, grants, now)
        used_after = allowance_used_after(used or 0, split)
        drawn = {d.grant_id: d.amount for d in split.credits}
        grants_after = [OpenGrant(g.id, g.remaining - drawn.get(g.id, 0), g.expires_at, g.created_at) for g in grants]
        kinds: list[str] = []
        if charge and self._notifications:
            kind = crossed(
                usage_state(limits, used or 0, current.credits),
                usage_state(limits, used_after, sum(g.remaining for g in grants_after)),
            )
            if kind is not None:
                kinds.append(kind.value)
            if used is None and row["renewed"]:
                kinds.append(NotificationKind.RENEWED.value)
        entries: list[tuple[str, int, int | None]] = []
        if split.allowance:
            entries.append(("allowance", -split.allowance, None))
        entries.extend(("credit", -d.amount, d.grant_id) for d in split.credits)
        if split.overdraft:
            entries.append(("overdraft", -split.overdraft, None))
        written = await conn.fetchrow(
            _SETTLE_WRITE,
            usage.user_id,
            row["version"],
            usage.request_id,
            usage.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cost if usage.succeeded else 0,
            cycle,
            "succeeded" if usage.succeeded else "failed",
            usage.estimated,
            usage.source,
            usage.occurred_at,
            charge,
            list(drawn),
            list(drawn.values()),
            used_after,
            _usage_reason(usage),
            [source for source, _, _ in entries],
            [amount for _, amount, _ in entries],
            [grant_id for _, _, grant_id in entries],
            kinds,
            *self._outbox_status,
        )
        if not written["locked"]:
            return None
        if not written["inserted"]:
            # Settled meanwhile under another account (whose row lock this one's does not cover): a repeat.
            first = await conn.fetchrow(
                "SELECT user_id, cost FROM usage_events WHERE request_id = $1", usage.request_id
            )
            return await self._repeat(conn, first["user_id"], first["cost"], None, cycle, now)
        outcome = SettleOutcome(
            charged=usage.succeeded, cost=usage.cost if usage.succeeded else 0, user_id=usage.user_id
        )
        if not charge:
            return outcome, current
        snapshot = LedgerSnapshot(
            user_id=usage.user_id,
            cycle=cycle,
            limits=limits,
            allowance_used=used_after,
            credits=sum(g.remaining for g in grants_after),
            next_credit_expiry=_next_expiry(grants_after),
            version=written["version"],
        )
        return outcome, snapshot

    async def _repeat(
        self,
        conn: asyncpg.Connection,
        user_id: str,
        cost: int,
        known: LedgerSnapshot | None,
        cycle: str,
        now: datetime,
    ) -> tuple[SettleOutcome, LedgerSnapshot]:
        """A request id settled before: its first outcome, and a fresh snapshot of the account it was charged to
        (`known` when that is the account just read)."""
        outcome = SettleOutcome(charged=False, cost=cost, user_id=user_id)
        if known is not None and known.user_id == user_id:
            return outcome, known
        return outcome, await self._snapshot(conn, user_id, cycle, now)

    @_store
    async def grant(self, grant: NewGrant, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        grant.validate(now)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_account(conn, grant.user_id)
            before = await self._snapshot(conn, grant.user_id, cycle, now)
            grant_id: int = await conn.fetchval(
                """INSERT INTO credit_grants (user_id, amount, remaining, reason, source, expires_at, created_by)
                   VALUES ($1, $2, $2, $3, $4, $5, $6) RETURNING id""",
                grant.user_id,
                grant.amount,
                grant.reason,
                grant.source,
                grant.expires_at,
                grant.actor,
            )
            await conn.execute(
                """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, reason, actor)
                   VALUES ($1, $2, 'grant', 'grant', $3, $4, $5, $6)""",
                grant.user_id,
                cycle,
                grant.amount,
                grant_id,
                grant.reason,
                grant.actor,
            )
            await _bump_version(conn, grant.user_id)
            if self._notifications:
                await _enqueue(conn, grant.user_id, cycle, NotificationKind.CREDITS, grant.amount, self._outbox_status)
            after = await self._snapshot(conn, grant.user_id, cycle, now)
            await _audit(
                conn,
                grant.actor,
                "credits.grant",
                grant.user_id,
                {"credits": before.credits},
                {
                    "credits": after.credits,
                    "grant_id": grant_id,
                    "amount": grant.amount,
                    "source": grant.source,
                    "expires_at": grant.expires_at.isoformat() if grant.expires_at else None,
                },
                grant.reason,
            )
        return grant_id, after

    @_store
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
        async with self._pool.acquire() as conn, conn.transaction():
            created = await conn.fetchval(
                """INSERT INTO accounts (user_id, plan_id) VALUES ($1, $2)
                   ON CONFLICT (user_id) DO NOTHING RETURNING true""",
                user_id,
                changes.plan_id or default_plan,
            )
            account = await self._lock_account(conn, user_id)
            after = changes.apply(account)
            await conn.execute(
                """UPDATE accounts SET email = $2, name = $3, plan_id = $4, allowance_override = $5,
                       updated_at = now() WHERE user_id = $1""",
                user_id,
                after.email,
                after.name,
                after.plan_id,
                after.allowance_override,
            )
            await _bump_version(conn, user_id)
            before = None if created else account_fields(account)
            await _audit(conn, actor, "account.upsert", user_id, before, account_fields(after), reason)
            return await self._snapshot(conn, user_id, cycle, now)

    @_store
    async def set_status(
        self, user_id: str, status: AccountStatus, reason: str, actor: str, cycle: str, now: datetime
    ) -> LedgerSnapshot:
        async with self._pool.acquire() as conn, conn.transaction():
            account = await self._lock_account(conn, user_id)
            await conn.execute(
                """UPDATE accounts SET status = $2, status_reason = $3, updated_at = now() WHERE user_id = $1""",
                user_id,
                status.value,
                reason,
            )
            await _bump_version(conn, user_id)
            await _audit(
                conn,
                actor,
                f"account.{'suspend' if status is AccountStatus.SUSPENDED else 'activate'}",
                user_id,
                {"status": account.status.value},
                {"status": status.value},
                reason,
            )
            return await self._snapshot(conn, user_id, cycle, now)

    @_store
    async def adjust(self, adjustment: Adjustment, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        if adjustment.amount <= 0:
            raise InvalidRequest("amount must be positive")
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_account(conn, adjustment.user_id)
            before = await self._snapshot(conn, adjustment.user_id, cycle, now)
            rows = await conn.fetch(
                """SELECT id, remaining, expires_at, created_at FROM credit_grants
                   WHERE user_id = $1 AND remaining > 0 AND (expires_at IS NULL OR expires_at > $2)
                   FOR UPDATE""",
                adjustment.user_id,
                now,
            )
            grants = [OpenGrant(r["id"], r["remaining"], r["expires_at"], r["created_at"]) for r in rows]
            rest = adjustment.amount
            draws: list[tuple[int, int]] = []
            for grant in spend_order(grants, now):
                if rest == 0:
                    break
                take = min(rest, grant.remaining)
                draws.append((grant.id, take))
                rest -= take
            removed = adjustment.amount - rest
            if removed == 0:
                raise InvalidRequest(f"account {adjustment.user_id!r} has no credits to remove")
            await conn.executemany("UPDATE credit_grants SET remaining = remaining - $2 WHERE id = $1", draws)
            await conn.executemany(
                """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, grant_id, reason, actor)
                   VALUES ($1, $2, 'adjustment', 'credit', $3, $4, $5, $6)""",
                [
                    (adjustment.user_id, cycle, -take, grant_id, adjustment.reason, adjustment.actor)
                    for grant_id, take in draws
                ],
            )
            await _bump_version(conn, adjustment.user_id)
            after = await self._snapshot(conn, adjustment.user_id, cycle, now)
            await _audit(
                conn,
                adjustment.actor,
                "credits.adjust",
                adjustment.user_id,
                {"credits": before.credits},
                {"credits": after.credits, "requested": adjustment.amount, "removed": removed},
                adjustment.reason,
            )
        return removed, after

    @_store
    async def reset_cycle(self, user_id: str, reason: str, actor: str, cycle: str, now: datetime) -> LedgerSnapshot:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_account(conn, user_id)
            used = await conn.fetchval(
                "SELECT allowance_used FROM account_cycles WHERE user_id = $1 AND cycle = $2", user_id, cycle
            )
            await conn.execute(
                """INSERT INTO account_cycles (user_id, cycle, allowance_used) VALUES ($1, $2, 0)
                   ON CONFLICT (user_id, cycle) DO UPDATE SET allowance_used = 0""",
                user_id,
                cycle,
            )
            await conn.execute(
                """INSERT INTO ledger_entries (user_id, cycle, kind, draws_from, amount, reason, actor)
                   VALUES ($1, $2, 'reset', 'allowance', $3, $4, $5)""",
                user_id,
                cycle,
                used or 0,
                reason,
                actor,
            )
            await _bump_version(conn, user_id)
            await _audit(
                conn,
                actor,
                "cycle.reset",
                user_id,
                {"cycle": cycle, "allowance_used": used or 0},
                {"cycle": cycle, "allowance_used": 0},
                reason,
            )
            return await self._snapshot(conn, user_id, cycle, now)

    # -- the notification outbox -------------------------------------------------------------------------

    @_store
    async def claim_notifications(self, limit: int, lease_seconds: float) -> list[PendingNotification]:
        """Due pending rows, leased for lease_seconds so no other sender takes them meanwhile.

        Time here is the database's: retries are operational, not part of the billing clock."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """UPDATE notifications n
                   SET attempts = n.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
                   FROM accounts a
                   WHERE a.user_id = n.user_id AND n.id IN (
                       SELECT id FROM notifications
                       WHERE status = 'pending' AND next_attempt_at <= now()
                       ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                   RETURNING n.id, n.user_id, n.cycle, n.kind, n.amount, n.attempts, a.email, a.name""",
                limit,
                float(lease_seconds),
            )
        return [
            PendingNotification(
                r["id"],
                r["user_id"],
                r["cycle"],
                NotificationKind(r["kind"]),
                r["amount"],
                r["attempts"],
                r["email"],
                r["name"],
            )
            for r in sorted(rows, key=lambda r: int(r["id"]))
        ]

    @_store
    async def finish_notification(self, notification_id: int, status: str) -> None:
        """Marks a row sent (the SMTP server accepted it) or skipped (no address)."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE notifications SET status = $2, sent_at = CASE WHEN $2 = 'sent' THEN now() END,
                       last_error = '' WHERE id = $1""",
                notification_id,
                status,
            )

    @_store
    async def retry_notification(self, notification_id: int, error: str, delay_seconds: float) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE notifications SET last_error = $2, next_attempt_at = now() + make_interval(secs => $3)
                   WHERE id = $1 AND status = 'pending'""",
                notification_id,
                error[:1000],
                float(delay_seconds),
            )

    @_store
    async def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookEvent]:
        """Due rows for the webhook, leased as claim_notifications does for e-mails (columns of their own)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """UPDATE notifications n
                   SET hook_attempts = n.hook_attempts + 1,
                       hook_next_attempt_at = now() + make_interval(secs => $2)
                   FROM accounts a
                   WHERE a.user_id = n.user_id AND n.id IN (
                       SELECT id FROM notifications
                       WHERE hook_status = 'pending' AND hook_next_attempt_at <= now()
                       ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                   RETURNING n.id, n.event_id::text AS event_id, n.user_id, n.cycle, n.kind, n.amount,
                             n.hook_attempts, n.created_at, a.email, a.name""",
                limit,
                float(lease_seconds),
            )
        return [
            WebhookEvent(
                id=r["id"],
                event_id=r["event_id"],
                user_id=r["user_id"],
                cycle=r["cycle"],
                kind=NotificationKind(r["kind"]),
                amount=r["amount"],
                attempts=r["hook_attempts"],
                created_at=r["created_at"],
                email=r["email"],
                name=r["name"],
            )
            for r in sorted(rows, key=lambda r: int(r["id"]))
        ]

    @_store
    async def finish_webhook(self, notification_id: int) -> None:
        """Marks a row delivered to the webhook (the receiver answered 2xx)."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE notifications SET hook_status = 'sent', hook_sent_at = now(), hook_last_error = ''
                   WHERE id = $1""",
                notification_id,
            )

    @_store
    async def retry_webhook(self, notification_id: int, error: str, delay_seconds: float) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE notifications SET hook_last_error = $2,
                       hook_next_attempt_at = now() + make_interval(secs => $3)
                   WHERE id = $1 AND hook_status = 'pending'""",
                notification_id,
                error[:1000],
                float(delay_seconds),
            )

    async def notifications_of(self, user_id: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM notifications WHERE user_id = $1 ORDER BY id", user_id)
        return [dict(r) for r in rows]

    # -- admin queries (LedgerQueries) -------------------------------------------------------------------

    @_store
    async def list_accounts(
        self, after: str, limit: int, plan: str, query: str, cycle: str, now: datetime
    ) -> AccountPage:
        pattern = ""
        if query:
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{escaped}%"
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_SNAPSHOT_COLUMNS}
                    FROM accounts a
                    LEFT JOIN account_cycles ac ON ac.user_id = a.user_id AND ac.cycle = $2
                    WHERE a.user_id > $1
                      AND ($4 = '' OR a.plan_id = $4)
                      AND ($5 = '' OR a.user_id ILIKE $5 OR a.email ILIKE $5 OR a.name ILIKE $5)
                    ORDER BY a.user_id
                    LIMIT $6""",
                after,
                cycle,
                now,
                plan,
                pattern,
                limit + 1,
            )
        items = [(_account(r), self._snapshot_of(r, cycle)) for r in rows[:limit]]
        return AccountPage(items=items, exhausted=len(rows) <= limit)

    @_store
    async def usage_totals(
        self, user_id: str, start: datetime, end: datetime, group_by: str, timezone: str
    ) -> list[UsageTotals]:
        period = "to_char(occurred_at AT TIME ZONE $4, 'YYYY-MM-DD')" if group_by == "day" else "''"
        model = "model" if group_by == "model" else "''"
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {period} AS period, {model} AS model, count(*) AS requests,
                        coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                        coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                        coalesce(sum(cost), 0)::bigint AS cost
                    FROM usage_events
                    WHERE user_id = $1 AND status = 'succeeded' AND occurred_at >= $2 AND occurred_at < $3
                      AND $4::text IS NOT NULL
                    GROUP BY 1, 2
                    HAVING count(*) > 0
                    ORDER BY 1, 2""",
                user_id,
                start,
                end,
                timezone,
            )
        return [
            UsageTotals(r["period"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cost"])
            for r in rows
        ]

    @_store
    async def audit_log(self, target: str, action: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT id, actor, action, target, before::text AS before, after::text AS after, reason,
                          created_at
                   FROM audit_log
                   WHERE ($1 = '' OR target = $1) AND ($2 = '' OR action = $2) AND ($3 = 0 OR id < $3)
                   ORDER BY id DESC LIMIT $4""",
                target,
                action,
                before_id,
                limit,
            )
        return [dict(r) for r in rows]

    @_store
    async def ledger_entries(self, user_id: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT id, cycle, kind, draws_from, amount, grant_id, request_id, reason, actor, created_at
                   FROM ledger_entries
                   WHERE user_id = $1 AND ($2 = 0 OR id < $2)
                   ORDER BY id DESC LIMIT $3""",
                user_id,
                before_id,
                limit,
            )
        return [dict(r) for r in rows]

    async def export_usage(
        self, user_id: str, start: datetime, end: datetime, batch_size: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                cursor = await conn.cursor(
                    f"""SELECT {EXPORT_COLUMNS} FROM usage_events
                        WHERE ($1 = '' OR user_id = $1) AND occurred_at >= $2 AND occurred_at < $3
                        ORDER BY occurred_at, request_id""",
                    user_id,
                    start,
                    end,
                )
                while rows := await cursor.fetch(batch_size):
                    yield [dict(r) for r in rows]
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc

    # -- client keys (ClientKeyStore) ---------------------------------------------------------------------

    @_store
    async def create_client_key(self, key: ClientKeyRecord, reason: str) -> ClientKeyRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO client_keys (name, key_sha256, trusted, user_id, created_at, created_by)
                    VALUES ($1, $2, $3, $4, $5, $6)
                    ON CONFLICT DO NOTHING RETURNING {_KEY_COLUMNS}""",
                key.name,
                key.key_sha256,
                key.trusted,
                key.user_id,
                key.created_at,
                key.created_by,
            )
            if row is None:
                raise InvalidRequest(f"a client key named {key.name!r} exists already")
            created = _client_key(row)
            await _audit(conn, key.created_by, "client_key.create", key.name, None, _key_json(created), reason)
        return created

    @_store
    async def revoke_client_key(self, name: str, reason: str, actor: str) -> ClientKeyRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM client_keys WHERE name = $1 FOR UPDATE", name)
            if row is None:
                raise NotFound(f"no client key {name!r}")
            before = _client_key(row)
            if before.revoked_at is not None:
                raise InvalidRequest(f"client key {name!r} is revoked already")
            row = await conn.fetchrow(
                f"UPDATE client_keys SET revoked_at = now() WHERE name = $1 RETURNING {_KEY_COLUMNS}", name
            )
            after = _client_key(row)
            await _audit(conn, actor, "client_key.revoke", name, _key_json(before), _key_json(after), reason)
        return after

    @_store
    async def client_keys(self, include_revoked: bool) -> list[ClientKeyRecord]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM client_keys WHERE $1 OR revoked_at IS NULL ORDER BY name",
                include_revoked,
            )
        return [_client_key(r) for r in rows]

    async def usage_events(self, user_id: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM usage_events WHERE user_id = $1 ORDER BY recorded_at, request_id", user_id
            )
        return [dict(r) for r in rows]

    async def audit_entries(self, target: str) -> list[dict[str, Any]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM audit_log WHERE target = $1 ORDER BY id", target)
        return [dict(r) for r in rows]


_PLAN_COLUMNS = """p.id, p.name, p.monthly_allowance, p.warn_threshold, p.critical_threshold, p.model_weights::text
    AS model_weights, p.active, p.created_at, p.updated_at"""
_PLAN_ACCOUNTS = "(SELECT count(*) FROM accounts a WHERE a.plan_id = p.id) AS accounts"


def _plan_args(plan: Plan) -> tuple[Any, ...]:
    weights = [{"pattern": w.pattern, "input": w.input, "output": w.output} for w in plan.weights]
    return (
        plan.id,
        plan.name,
        plan.monthly_allowance,
        plan.warn_threshold,
        plan.critical_threshold,
        json.dumps(weights),
        plan.active,
    )


def _plan_record(row: asyncpg.Record) -> PlanRecord:
    weights = tuple(
        ModelWeight(w["pattern"], float(w.get("input", 1.0)), float(w.get("output", 1.0)))
        for w in json.loads(row["model_weights"] or "[]")
    )
    plan = Plan(
        id=row["id"],
        name=row["name"],
        monthly_allowance=row["monthly_allowance"],
        warn_threshold=row["warn_threshold"],
        critical_threshold=row["critical_threshold"],
        weights=weights,
        active=row["active"],
    )
    return PlanRecord(plan=plan, accounts=row["accounts"], created_at=row["created_at"], updated_at=row["updated_at"])


_KEY_COLUMNS = "name, key_sha256, trusted, user_id, created_at, created_by, revoked_at"


def _client_key(row: asyncpg.Record) -> ClientKeyRecord:
    return ClientKeyRecord(
        name=row["name"],
        key_sha256=row["key_sha256"],
        trusted=row["trusted"],
        user_id=row["user_id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        revoked_at=row["revoked_at"],
    )


def _key_json(key: ClientKeyRecord) -> dict[str, Any]:
    """A client key for the audit log: never the secret, nor its digest."""
    return {
        "name": key.name,
        "trusted": key.trusted,
        "user_id": key.user_id,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def _usage_reason(usage: UsageRecord) -> str:
    kind = "estimated" if usage.estimated else "reported"
    return f"{usage.model or 'unknown model'}: {kind} by {usage.source or 'api'}"


def _next_expiry(grants: Sequence[OpenGrant]) -> datetime | None:
    """The first expiry among open grants (as the snapshot query has it for grants not yet expired)."""
    return min((g.expires_at for g in grants if g.remaining > 0 and g.expires_at is not None), default=None)


def previous_cycle(cycle: str) -> str:
    """The cycle key before "2026-11" is "2026-10"; before "2027-01" is "2026-12"."""
    year, month = (int(part) for part in cycle.split("-", 1))
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


async def _enqueue(
    conn: asyncpg.Connection,
    user_id: str,
    cycle: str,
    kind: NotificationKind,
    amount: int,
    statuses: tuple[str, str],
) -> None:
    """Puts a notification in the outbox within the caller's transaction; a kind already there this cycle stays.
    `statuses`: the e-mail's and the webhook's status to start with."""
    await conn.execute(
        """INSERT INTO notifications (user_id, cycle, kind, amount, status, hook_status)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (user_id, cycle, kind) DO NOTHING""",
        user_id,
        cycle,
        kind.value,
        amount,
        *statuses,
    )


async def _bump_version(conn: asyncpg.Connection, user_id: str) -> None:
    """Every change to an account's balance (its grants, its cycles' figures) bumps the version while holding
    the account's row lock: record_usage reads without the lock and writes only if the version is unchanged."""
    await conn.execute("UPDATE accounts SET version = version + 1 WHERE user_id = $1", user_id)


def _account_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"plan": row["plan_id"], "status": row["status"], "email": row["email"], "name": row["name"]}


async def _audit(
    conn: asyncpg.Connection,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
) -> None:
    await conn.execute(
        """INSERT INTO audit_log (actor, action, target, before, after, reason)
           VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6)""",
        actor,
        action,
        target,
        None if before is None else json.dumps(before),
        None if after is None else json.dumps(after),
        reason,
    )
