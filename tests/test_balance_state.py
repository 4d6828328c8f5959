"""Quota state from allowance consumed, blocked when nothing is left, and the admission rule (DESIGN.md)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from quotagate.core.decide import Decision, Verdict, admits
from quotagate.core.model import AccountLimits, AccountStatus, AdmissionMode, Balance, QuotaState, state_for_fraction

RESET = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
ACTIVE = AccountStatus.ACTIVE
SUSPENDED = AccountStatus.SUSPENDED
DEFAULT = AdmissionMode.DEFAULT
STRICT = AdmissionMode.STRICT


def limits(
    allowance: int = 1000, status: AccountStatus = ACTIVE, warn: float = 0.80, crit: float = 0.95
) -> AccountLimits:
    return AccountLimits(status=status, plan_id="p", allowance=allowance, warn_threshold=warn, critical_threshold=crit)


def balance(
    used: int,
    allowance: int = 1000,
    credits: int = 0,
    reserved: int = 0,
    status: AccountStatus = ACTIVE,
) -> Balance:
    return Balance(
        user_id="u",
        cycle="2026-11",
        resets_at=RESET,
        limits=limits(allowance, status),
        allowance_used=used,
        credits=credits,
        reserved=reserved,
    )


# -- left / remaining / used_percent ----------------------------------------------------------------------


def test_left_is_allowance_minus_used_plus_credits_minus_reservations() -> None:
    b = balance(used=300, credits=50, reserved=100)
    assert b.left == 1000 - 300 + 50 - 100
    assert b.remaining == b.left
    assert b.allowance == 1000


def test_left_goes_negative_after_an_overdraft_but_remaining_does_not() -> None:
    b = balance(used=1100, credits=20)
    assert b.left == -80
    assert b.remaining == 0


def test_used_percent_rounds_down_to_one_decimal() -> None:
    assert balance(used=0).used_percent == 0.0
    assert balance(used=800).used_percent == 80.0
    assert balance(used=1, allowance=3).used_percent == 33.3
    assert balance(used=2, allowance=3).used_percent == 66.6  # never rounded up to 66.7
    assert balance(used=999, allowance=1000).used_percent == 99.9
    assert balance(used=9999, allowance=10000).used_percent == 99.9  # not 100.0 before it is all used
    assert balance(used=57, allowance=100).used_percent == 57.0


def test_used_percent_is_exact_for_every_small_allowance() -> None:
    for allowance in range(1, 301):
        for used in range(allowance + 1):
            expected = (used * 1000 // allowance) / 10  # integer arithmetic, floor
            assert balance(used=used, allowance=allowance).used_percent == expected, (used, allowance)


def test_used_percent_beyond_the_allowance() -> None:
    assert balance(used=1500).used_percent == 150.0


def test_used_fraction_ignores_credits_and_reservations() -> None:
    assert balance(used=500, credits=10_000, reserved=400).used_fraction == 0.5


# -- state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        (0, QuotaState.NORMAL),
        (799, QuotaState.NORMAL),
        (800, QuotaState.WARN),
        (949, QuotaState.WARN),
        (950, QuotaState.CRITICAL),
        (999, QuotaState.CRITICAL),
    ],
)
def test_state_thresholds(used: int, expected: QuotaState) -> None:
    assert balance(used=used).state is expected


def test_exact_thresholds_on_the_demo_allowance() -> None:
    # 300 tokens: 240 is exactly 80%, 285 exactly 95%.
    assert balance(used=239, allowance=300).state is QuotaState.NORMAL
    assert balance(used=240, allowance=300).state is QuotaState.WARN
    assert balance(used=284, allowance=300).state is QuotaState.WARN
    assert balance(used=285, allowance=300).state is QuotaState.CRITICAL


def test_exact_thresholds_hold_for_many_allowances() -> None:
    for allowance in range(20, 2001, 20):  # multiples of 20, so 80% and 95% are whole numbers
        warn_at, crit_at = allowance * 80 // 100, allowance * 95 // 100
        assert balance(used=warn_at - 1, allowance=allowance).state is QuotaState.NORMAL
        assert balance(used=warn_at, allowance=allowance).state is QuotaState.WARN
        assert balance(used=crit_at - 1, allowance=allowance).state is QuotaState.WARN
        assert balance(used=crit_at, allowance=allowance).state is QuotaState.CRITICAL


def test_blocked_when_allowance_spent_and_no_credits() -> None:
    assert balance(used=1000).state is QuotaState.BLOCKED
    assert balance(used=1200).state is QuotaState.BLOCKED


def test_blocked_when_reservations_hold_the_rest() -> None:
    b = balance(used=900, reserved=100)
    assert b.left == 0
    assert b.state is QuotaState.BLOCKED


def test_blocked_even_at_low_usage_when_reservations_hold_everything() -> None:
    b = balance(used=100, reserved=900)
    assert b.state is QuotaState.BLOCKED


def test_one_token_left_is_not_blocked() -> None:
    assert balance(used=999).state is QuotaState.CRITICAL
    # the state comes from the allowance consumed (settled), not from what requests in flight hold
    assert balance(used=900, reserved=99).state is QuotaState.WARN


def test_credits_left_is_never_blocked_even_with_all_allowance_used() -> None:
    b = balance(used=1000, credits=500)
    assert b.left == 500
    assert b.state is QuotaState.CRITICAL
    assert balance(used=1000, credits=1).state is QuotaState.CRITICAL


def test_credits_all_reserved_is_blocked() -> None:
    assert balance(used=1000, credits=50, reserved=50).state is QuotaState.BLOCKED


def test_suspended_wins_over_everything() -> None:
    assert balance(used=0, status=SUSPENDED).state is QuotaState.SUSPENDED
    assert balance(used=1000, status=SUSPENDED).state is QuotaState.SUSPENDED
    assert balance(used=960, credits=100, status=SUSPENDED).state is QuotaState.SUSPENDED


def test_zero_allowance_without_credits_is_blocked() -> None:
    b = balance(used=0, allowance=0)
    assert b.left == 0
    assert b.used_fraction == 1.0
    assert b.used_percent == 100.0
    assert b.state is QuotaState.BLOCKED


def test_zero_allowance_with_credits_is_critical_not_blocked() -> None:
    b = balance(used=0, allowance=0, credits=100)
    assert b.left == 100
    assert b.state is QuotaState.CRITICAL


# -- state_for_fraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.0, QuotaState.NORMAL),
        (0.7999, QuotaState.NORMAL),
        (0.80, QuotaState.WARN),
        (0.9499, QuotaState.WARN),
        (0.95, QuotaState.CRITICAL),
        (1.0, QuotaState.CRITICAL),
        (3.0, QuotaState.CRITICAL),
    ],
)
def test_state_for_fraction_default_thresholds(fraction: float, expected: QuotaState) -> None:
    assert state_for_fraction(fraction, limits()) is expected


def test_state_for_fraction_uses_the_plans_thresholds() -> None:
    custom = limits(warn=0.5, crit=0.7)
    assert state_for_fraction(0.49, custom) is QuotaState.NORMAL
    assert state_for_fraction(0.5, custom) is QuotaState.WARN
    assert state_for_fraction(0.7, custom) is QuotaState.CRITICAL


def test_state_for_fraction_equal_thresholds_skip_warn() -> None:
    same = limits(warn=0.9, crit=0.9)
    assert state_for_fraction(0.89, same) is QuotaState.NORMAL
    assert state_for_fraction(0.9, same) is QuotaState.CRITICAL


# -- admits ---------------------------------------------------------------------------------------------


def test_default_mode_admits_while_anything_is_left() -> None:
    assert admits(ACTIVE, left=1, estimate=5000, mode=DEFAULT) is Verdict.ALLOW
    assert admits(ACTIVE, left=0, estimate=1, mode=DEFAULT) is Verdict.DENY_QUOTA
    assert admits(ACTIVE, left=-10, estimate=1, mode=DEFAULT) is Verdict.DENY_QUOTA


def test_strict_mode_admits_only_when_the_estimate_fits() -> None:
    assert admits(ACTIVE, left=100, estimate=100, mode=STRICT) is Verdict.ALLOW
    assert admits(ACTIVE, left=100, estimate=101, mode=STRICT) is Verdict.DENY_QUOTA
    assert admits(ACTIVE, left=1, estimate=5000, mode=STRICT) is Verdict.DENY_QUOTA
    assert admits(ACTIVE, left=0, estimate=1, mode=STRICT) is Verdict.DENY_QUOTA


@pytest.mark.parametrize("mode", [DEFAULT, STRICT])
@pytest.mark.parametrize("left", [-100, 0, 1, 1000])
def test_zero_estimate_always_admitted_when_active(mode: AdmissionMode, left: int) -> None:
    assert admits(ACTIVE, left=left, estimate=0, mode=mode) is Verdict.ALLOW


@pytest.mark.parametrize("mode", [DEFAULT, STRICT])
@pytest.mark.parametrize(("left", "estimate"), [(10**9, 1), (0, 0), (-5, 10), (100, 0)])
def test_suspended_always_denied(mode: AdmissionMode, left: int, estimate: int) -> None:
    assert admits(SUSPENDED, left=left, estimate=estimate, mode=mode) is Verdict.DENY_SUSPENDED


# -- Decision -------------------------------------------------------------------------------------------


def decision(verdict: Verdict, b: Balance, estimate: int = 100) -> Decision:
    return Decision(verdict=verdict, balance=b, estimate=estimate, reserved=verdict is Verdict.ALLOW)


def test_decision_allowed_state_follows_the_allowance_consumed() -> None:
    assert decision(Verdict.ALLOW, balance(used=100)).state is QuotaState.NORMAL
    assert decision(Verdict.ALLOW, balance(used=800)).state is QuotaState.WARN
    assert decision(Verdict.ALLOW, balance(used=960)).state is QuotaState.CRITICAL


def test_decision_allowed_is_never_blocked_even_taking_the_last_tokens() -> None:
    d = decision(Verdict.ALLOW, balance(used=999), estimate=500)
    assert d.allowed
    assert d.state is QuotaState.CRITICAL
    assert d.warn


def test_decision_denied_for_quota_is_blocked() -> None:
    d = decision(Verdict.DENY_QUOTA, balance(used=1000))
    assert not d.allowed
    assert d.state is QuotaState.BLOCKED
    assert not d.warn


def test_decision_denied_for_quota_in_strict_mode_with_tokens_left_is_blocked() -> None:
    d = decision(Verdict.DENY_QUOTA, balance(used=100), estimate=5000)
    assert d.state is QuotaState.BLOCKED


def test_decision_suspended() -> None:
    d = decision(Verdict.DENY_SUSPENDED, balance(used=0, status=SUSPENDED))
    assert not d.allowed
    assert d.state is QuotaState.SUSPENDED
    assert not d.warn


@pytest.mark.parametrize(("used", "warn"), [(0, False), (799, False), (800, True), (950, True), (999, True)])
def test_decision_warn_in_warn_and_critical(used: int, warn: bool) -> None:
    assert decision(Verdict.ALLOW, balance(used=used)).warn is warn


# -- when ext_proc may answer before the charge lands -------------------------------------------------------


def allowed(b: Balance, estimate: int) -> Decision:
    return Decision(Verdict.ALLOW, b, estimate, reserved=estimate > 0)


def test_the_charge_lands_after_the_answer_only_while_every_hold_keeps_the_user_normal() -> None:
    # Allowance 1000, warn at 80%: used + all holds + this estimate must stay under 800.
    assert allowed(balance(used=500, reserved=200), 99).settles_unseen
    assert not allowed(balance(used=500, reserved=200), 100).settles_unseen  # exactly 80%: warn
    assert not allowed(balance(used=799), 0).settles_unseen  # nothing reserved: nothing to settle later
    assert allowed(balance(used=0), 799).settles_unseen


def test_near_or_past_a_threshold_the_charge_lands_first() -> None:
    assert not allowed(balance(used=800), 1).settles_unseen  # warn already
    assert not allowed(balance(used=960), 1).settles_unseen  # critical
    # Credits only (no allowance): every state shows the allowance spent, so always settle first.
    assert not allowed(balance(used=0, allowance=0, credits=10_000), 10).settles_unseen
    suspended = Decision(Verdict.DENY_SUSPENDED, balance(used=0, status=SUSPENDED), 10, reserved=False)
    assert not suspended.settles_unseen
    denied = Decision(Verdict.DENY_QUOTA, balance(used=1000), 10, reserved=False)
    assert not denied.settles_unseen
