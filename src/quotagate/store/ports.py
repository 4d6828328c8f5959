"""The store ports. The ledger (PostgreSQL) is the record; the hot state (Redis) serves Check.

Both have an in-memory reference implementation (store/memory.py) and one behaviour suite runs against all
of them (tests/test_stores.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from quotagate.core.errors import InvalidRequest
from quotagate.core.model import (
    AccountLimits,
    AccountStatus,
    AdmissionMode,
    LedgerSnapshot,
    Plan,
    Reservation,
)
from quotagate.core.plans import PlanChanges


@dataclass(frozen=True)
class AccountRecord:
    user_id: str
    email: str
    name: str
    plan_id: str
    status: AccountStatus
    status_reason: str
    allowance_override: int | None
    warn_threshold: float | None
    critical_threshold: float | None
    created_at: datetime


# Resolves an account's plan, override and thresholds into the numbers the decision uses.
LimitsOf = Callable[[AccountRecord], AccountLimits]


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    occurred_at: datetime
    estimated: bool = False
    source: str = ""
    succeeded: bool = True


@dataclass(frozen=True)
class SettleOutcome:
    charged: bool  # False: this request id was settled before
    cost: int  # the cost recorded for the request id (the first one, on repeats)
    user_id: str


@dataclass(frozen=True)
class NewGrant:
    user_id: str
    amount: int
    reason: str
    expires_at: datetime | None = None
    source: str = "admin"
    actor: str = ""

    def validate(self, now: datetime) -> None:
        if self.amount <= 0:
            raise InvalidRequest("amount must be positive")
        if self.expires_at is not None and self.expires_at <= now:
            raise InvalidRequest("expires_at must be in the future")


@dataclass(frozen=True)
class NewAccount:
    user_id: str
    email: str = ""
    name: str = ""


class Ledger(Protocol):
    async def ensure_account(self, account: NewAccount, plan_id: str) -> AccountRecord: ...

    async def get_account(self, user_id: str) -> AccountRecord | None: ...

    async def snapshot(self, user_id: str, cycle: str, now: datetime) -> LedgerSnapshot:
        """Raises NotFound for an unknown account."""
        ...

    async def record_usage(self, usage: UsageRecord, cycle: str, now: datetime) -> tuple[SettleOutcome, LedgerSnapshot]:
        """Charges usage.cost once per request id (allowance, then credits, then overdraft), in one
        transaction; returns the account's snapshot for `cycle` afterwards."""
        ...

    async def grant(self, grant: NewGrant, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        """Adds a credit grant (validated with NewGrant.validate); returns its id and the snapshot after."""
        ...

    async def set_status(
        self, user_id: str, status: AccountStatus, reason: str, actor: str, cycle: str, now: datetime
    ) -> LedgerSnapshot: ...

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
        """Creates the account (with `default_plan` unless the changes name a plan) or updates it; audited."""
        ...

    async def adjust(self, adjustment: Adjustment, cycle: str, now: datetime) -> tuple[int, LedgerSnapshot]:
        """Removes up to adjustment.amount credit tokens (earliest-expiring grants first, never below 0);
        returns the tokens removed and the snapshot after. Ledger entries kind 'adjustment', one audit row."""
        ...

    async def reset_cycle(self, user_id: str, reason: str, actor: str, cycle: str, now: datetime) -> LedgerSnapshot:
        """Zeroes allowance_used in `cycle`; a ledger entry kind 'reset' and an audit row."""
        ...


@dataclass(frozen=True)
class AccountChanges:
    """What an admin sets on an account; None leaves a field as it is."""

    email: str | None = None
    name: str | None = None
    plan_id: str | None = None
    allowance_override: int | None = None
    clear_allowance_override: bool = False

    def apply(self, record: AccountRecord) -> AccountRecord:
        return replace(
            record,
            email=record.email if self.email is None else self.email,
            name=record.name if self.name is None else self.name,
            plan_id=record.plan_id if self.plan_id is None else self.plan_id,
            allowance_override=None
            if self.clear_allowance_override
            else (record.allowance_override if self.allowance_override is None else self.allowance_override),
        )


def account_fields(record: AccountRecord) -> dict[str, object]:
    """The fields an upsert can change, as the audit log shows them."""
    return {
        "email": record.email,
        "name": record.name,
        "plan": record.plan_id,
        "allowance_override": record.allowance_override,
    }


@dataclass(frozen=True)
class Adjustment:
    user_id: str
    amount: int  # tokens to remove, > 0
    reason: str
    actor: str = ""


@dataclass(frozen=True)
class AccountPage:
    """One batch of accounts in user_id order, each with its settled snapshot."""

    items: list[tuple[AccountRecord, LedgerSnapshot]]
    exhausted: bool  # no account after the last one in `items` matches


@dataclass(frozen=True)
class UsageTotals:
    period: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


@runtime_checkable
class LedgerQueries(Protocol):
    """Read-only admin queries; only the PostgreSQL ledger answers them."""

    async def list_accounts(
        self, after: str, limit: int, plan: str, query: str, cycle: str, now: datetime
    ) -> AccountPage: ...

    async def usage_totals(
        self, user_id: str, start: datetime, end: datetime, group_by: str, timezone: str
    ) -> list[UsageTotals]:
        """Succeeded usage with start <= occurred_at < end, grouped by 'day' (in `timezone`), 'model' or
        'none'."""
        ...

    async def audit_log(self, target: str, action: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        """Audit rows newest first, with id < before_id when before_id > 0."""
        ...

    async def ledger_entries(self, user_id: str, before_id: int, limit: int) -> list[dict[str, Any]]: ...

    def export_usage(
        self, user_id: str, start: datetime, end: datetime, batch_size: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Usage events with start <= occurred_at < end (of `user_id`, or of everyone when empty), ordered by
        occurred_at and request_id, in batches read through a server-side cursor (memory stays flat)."""
        ...


@dataclass(frozen=True)
class ClientKeyRecord:
    """A client key stored in the database (never its secret)."""

    name: str
    key_sha256: str
    trusted: bool
    user_id: str | None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None


@runtime_checkable
class ClientKeyStore(Protocol):
    """Client keys created through the Admin API; only the PostgreSQL ledger keeps them."""

    async def create_client_key(self, key: ClientKeyRecord, reason: str) -> ClientKeyRecord:
        """Stores the key and an audit row; InvalidRequest when the name (or digest) is taken."""
        ...

    async def revoke_client_key(self, name: str, reason: str, actor: str) -> ClientKeyRecord:
        """Marks the key revoked (NotFound for an unknown name, InvalidRequest when already revoked)."""
        ...

    async def client_keys(self, include_revoked: bool) -> list[ClientKeyRecord]: ...


@dataclass(frozen=True)
class PlanRecord:
    """A plan as the database keeps it."""

    plan: Plan
    accounts: int  # accounts on the plan
    created_at: datetime
    updated_at: datetime


@runtime_checkable
class PlanStore(Protocol):
    """Plans managed through the Admin API; only the PostgreSQL ledger keeps them."""

    async def plans(self, count_accounts: bool = False) -> list[PlanRecord]:
        """Every plan, ordered by id; PlanRecord.accounts is 0 unless count_accounts."""
        ...

    async def create_plan(self, plan: Plan, reason: str, actor: str) -> PlanRecord:
        """Stores a new plan and an audit row; InvalidRequest when the id is taken."""
        ...

    async def update_plan(self, plan_id: str, changes: PlanChanges, reason: str, actor: str) -> PlanRecord:
        """Applies the changes (validated with validate_plan) with an audit row of before and after; NotFound for
        an unknown plan."""
        ...


@dataclass(frozen=True)
class HotView:
    """The hot state of one account in one cycle, as Check sees it."""

    limits: AccountLimits
    allowance_used: int  # with the costs still settling
    credits: int
    reserved: int
    settling: int = 0  # costs of finished completions the ledger does not have yet (in allowance_used)


@dataclass(frozen=True)
class ReserveResult:
    admitted: bool
    view: HotView  # before this request's reservation
    # A reservation under this request id already existed: never admitted, since a repeated id is someone
    # reusing a request's key (Envoy makes a new one per request), never a retry that may pass.
    duplicate: bool = False


class HotState(Protocol):
    async def reserve(
        self,
        user_id: str,
        cycle: str,
        reservation: Reservation,
        mode: AdmissionMode,
        now: float,
    ) -> ReserveResult | None:
        """Decides and, when admitted with a positive estimate, holds the estimate — atomically.
        None when the account's hot state is missing or stale and must be loaded from the ledger."""
        ...

    async def view(self, user_id: str, cycle: str, now: float) -> HotView | None: ...

    async def load(self, snapshot: LedgerSnapshot) -> None:
        """Writes the snapshot unless a newer one is already there; keeps the reserved sum."""
        ...

    async def peek_reservation(self, request_id: str) -> Reservation | None: ...

    async def mark_settling(self, request_id: str, cost: int) -> bool:
        """Swaps a finished request's hold for its cost, counted as allowance used until settle(); False when
        the reservation is gone or was swapped already."""
        ...

    async def mark_forwarded(self, request_id: str) -> bool:
        """Notes that Envoy sent the request on after Check; False when there is no such reservation."""
        ...

    async def settle(self, request_id: str, snapshot: LedgerSnapshot | None) -> Reservation | None:
        """Releases the reservation (if still held) and applies the snapshot, in one step."""
        ...

    async def due_reservations(self, now: float, limit: int) -> list[str]: ...

    async def forget(self, user_id: str, cycle: str) -> None: ...
