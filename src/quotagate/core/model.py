"""Plain values the core works with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class AccountStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class QuotaState(StrEnum):
    NORMAL = "normal"
    WARN = "warn"
    CRITICAL = "critical"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"


class AdmissionMode(StrEnum):
    # default: admit while anything is left; overspend is bounded by the requests in flight.
    DEFAULT = "default"
    # strict: admit only when the estimate fits in what is left.
    STRICT = "strict"


@dataclass(frozen=True)
class ModelWeight:
    """Cost multipliers for models whose name matches `pattern` (fnmatch syntax)."""

    pattern: str
    input: float = 1.0
    output: float = 1.0


@dataclass(frozen=True)
class Plan:
    id: str
    monthly_allowance: int
    warn_threshold: float = 0.80
    critical_threshold: float = 0.95
    weights: tuple[ModelWeight, ...] = ()
    name: str = ""
    active: bool = True  # an inactive plan keeps its accounts but takes no new ones


@dataclass(frozen=True)
class AccountLimits:
    """What the hot path needs to know about an account, besides its spend."""

    status: AccountStatus
    plan_id: str
    allowance: int
    warn_threshold: float
    critical_threshold: float


@dataclass(frozen=True)
class LedgerSnapshot:
    """An account's settled position in one cycle, as the ledger of record sees it.

    `version` grows with every change to the account's balance, so a cache can refuse an older snapshot.
    """

    user_id: str
    cycle: str
    limits: AccountLimits
    allowance_used: int
    credits: int
    next_credit_expiry: datetime | None
    version: int


@dataclass(frozen=True)
class Balance:
    """A live view: the settled snapshot plus what requests in flight hold."""

    user_id: str
    cycle: str
    resets_at: datetime
    limits: AccountLimits
    allowance_used: int
    credits: int
    reserved: int

    @property
    def allowance(self) -> int:
        return self.limits.allowance

    @property
    def left(self) -> int:
        """Spendable tokens after active reservations; negative after an overdraft."""
        return self.limits.allowance - self.allowance_used + self.credits - self.reserved

    @property
    def remaining(self) -> int:
        return max(0, self.left)

    @property
    def used_fraction(self) -> float:
        if self.limits.allowance <= 0:
            return 1.0
        return self.allowance_used / self.limits.allowance

    @property
    def used_percent(self) -> float:
        return math.floor(self.used_fraction * 1000) / 10

    @property
    def state(self) -> QuotaState:
        if self.limits.status is AccountStatus.SUSPENDED:
            return QuotaState.SUSPENDED
        if self.left <= 0:
            return QuotaState.BLOCKED
        return state_for_fraction(self.used_fraction, self.limits)


def state_for_fraction(fraction: float, limits: AccountLimits) -> QuotaState:
    if fraction >= limits.critical_threshold:
        return QuotaState.CRITICAL
    if fraction >= limits.warn_threshold:
        return QuotaState.WARN
    return QuotaState.NORMAL


@dataclass(frozen=True)
class Reservation:
    request_id: str
    user_id: str
    cycle: str
    estimate: int
    model: str
    expires_at: float  # epoch seconds
    plan_id: str = ""  # the account's plan when it was reserved, which prices the usage that settles it
    # Envoy went on with the request after Check (ext_proc saw it): an unsettled hold is charged at its expiry
    # only then; one whose request never left Envoy (Check timed out, the client went away) is released.
    forwarded: bool = False


@dataclass(frozen=True)
class GrantDraw:
    grant_id: int
    amount: int


@dataclass(frozen=True)
class ChargeSplit:
    """How one cost is drawn: allowance first, then credits earliest-expiring first, then overdraft."""

    allowance: int
    credits: tuple[GrantDraw, ...] = field(default=())
    overdraft: int = 0

    @property
    def total(self) -> int:
        return self.allowance + sum(d.amount for d in self.credits) + self.overdraft
