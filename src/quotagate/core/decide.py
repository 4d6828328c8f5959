"""The admission rule and the decision it leads to.

The same rule runs inside Redis (store/lua/reserve.lua) so that checking and reserving are one atomic step;
tests/test_stores.py runs one behaviour suite against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from quotagate.core.model import AccountStatus, AdmissionMode, Balance, QuotaState, state_for_fraction


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY_QUOTA = "deny_quota"
    DENY_SUSPENDED = "deny_suspended"


def admits(status: AccountStatus, left: int, estimate: int, mode: AdmissionMode) -> Verdict:
    if status is AccountStatus.SUSPENDED:
        return Verdict.DENY_SUSPENDED
    if estimate <= 0:  # nothing billable (e.g. listing models)
        return Verdict.ALLOW
    if mode is AdmissionMode.STRICT:
        return Verdict.ALLOW if left >= estimate else Verdict.DENY_QUOTA
    return Verdict.ALLOW if left > 0 else Verdict.DENY_QUOTA


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    balance: Balance  # as it was before this request's reservation
    estimate: int
    reserved: bool

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def state(self) -> QuotaState:
        if self.verdict is Verdict.DENY_SUSPENDED:
            return QuotaState.SUSPENDED
        if self.verdict is Verdict.DENY_QUOTA:
            return QuotaState.BLOCKED
        # An admitted request is never shown as blocked, even if it takes the last tokens.
        return state_for_fraction(self.balance.used_fraction, self.balance.limits)

    @property
    def warn(self) -> bool:
        return self.state in (QuotaState.WARN, QuotaState.CRITICAL)

    @property
    def settles_unseen(self) -> bool:
        """Whether this request's charge may land just after its answer instead of before it.

        True when even every active hold, this one included, turned into a charge would leave the user in the
        normal state with tokens left: then, as long as the completion costs no more than its estimate (the
        hold), the next decision is the same whether it sees the hold or the charge; only the exact figures
        in its headers differ for those few milliseconds.
        """
        b = self.balance
        if not self.reserved or self.state is not QuotaState.NORMAL or b.allowance <= 0:
            return False
        committed = b.allowance_used + b.reserved + self.estimate
        if b.left - self.estimate <= 0:
            return False
        return state_for_fraction(committed / b.allowance, b.limits) is QuotaState.NORMAL
