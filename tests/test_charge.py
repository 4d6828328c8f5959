"""Spend draws the allowance first, then credits earliest-expiring first; what is left is an overdraft."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from quotagate.core.charge import OpenGrant, allowance_used_after, spend_order, split_charge
from quotagate.core.model import ChargeSplit, GrantDraw

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def grant(gid: int, remaining: int, expires_in_days: float | None = None, created_days_ago: float = 10) -> OpenGrant:
    expires = None if expires_in_days is None else NOW + timedelta(days=expires_in_days)
    return OpenGrant(id=gid, remaining=remaining, expires_at=expires, created_at=NOW - timedelta(days=created_days_ago))


def draws(split: ChargeSplit) -> list[tuple[int, int]]:
    return [(d.grant_id, d.amount) for d in split.credits]


# -- allowance first ---------------------------------------------------------------------------------------


def test_cost_within_allowance_takes_only_allowance() -> None:
    split = split_charge(300, allowance=1000, allowance_used=200, grants=[grant(1, 500)], now=NOW)
    assert split.allowance == 300
    assert split.credits == ()
    assert split.overdraft == 0
    assert split.total == 300


def test_cost_exactly_the_rest_of_the_allowance_touches_no_credit() -> None:
    split = split_charge(800, allowance=1000, allowance_used=200, grants=[grant(1, 500)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (800, [], 0)


def test_one_token_more_than_the_allowance_draws_one_credit() -> None:
    split = split_charge(801, allowance=1000, allowance_used=200, grants=[grant(1, 500)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (800, [(1, 1)], 0)


def test_allowance_spent_draws_credits_only() -> None:
    split = split_charge(50, allowance=1000, allowance_used=1000, grants=[grant(1, 500)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (0, [(1, 50)], 0)


def test_allowance_already_overdrawn_is_not_negative() -> None:
    split = split_charge(50, allowance=1000, allowance_used=1200, grants=[grant(1, 500)], now=NOW)
    assert split.allowance == 0
    assert draws(split) == [(1, 50)]


def test_zero_cost_draws_nothing() -> None:
    split = split_charge(0, allowance=1000, allowance_used=1000, grants=[grant(1, 5)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft, split.total) == (0, [], 0, 0)


def test_zero_allowance_plan_goes_straight_to_credits() -> None:
    split = split_charge(10, allowance=0, allowance_used=0, grants=[grant(1, 100)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (0, [(1, 10)], 0)


# -- credits, earliest-expiring first -------------------------------------------------------------------


def test_credits_drawn_earliest_expiring_first_never_expiring_last() -> None:
    grants = [grant(1, 100), grant(2, 100, expires_in_days=30), grant(3, 100, expires_in_days=5)]
    split = split_charge(250, allowance=0, allowance_used=0, grants=grants, now=NOW)
    assert draws(split) == [(3, 100), (2, 100), (1, 50)]
    assert split.overdraft == 0


def test_expiry_order_wins_over_creation_order() -> None:
    older_long = grant(1, 100, expires_in_days=60, created_days_ago=30)
    newer_short = grant(2, 100, expires_in_days=2, created_days_ago=1)
    split = split_charge(120, allowance=0, allowance_used=0, grants=[older_long, newer_short], now=NOW)
    assert draws(split) == [(2, 100), (1, 20)]


def test_never_expiring_grants_drawn_oldest_first() -> None:
    newer = grant(7, 100, created_days_ago=1)
    older = grant(9, 100, created_days_ago=20)
    split = split_charge(150, allowance=0, allowance_used=0, grants=[newer, older], now=NOW)
    assert draws(split) == [(9, 100), (7, 50)]


def test_same_expiry_ties_broken_by_creation() -> None:
    a = grant(1, 100, expires_in_days=10, created_days_ago=2)
    b = grant(2, 100, expires_in_days=10, created_days_ago=5)
    split = split_charge(130, allowance=0, allowance_used=0, grants=[a, b], now=NOW)
    assert draws(split) == [(2, 100), (1, 30)]


def test_never_expiring_grant_created_long_ago_still_comes_after_an_expiring_one() -> None:
    ancient = grant(1, 100, created_days_ago=3650)
    expiring = grant(2, 100, expires_in_days=300, created_days_ago=1)
    split = split_charge(10, allowance=0, allowance_used=0, grants=[ancient, expiring], now=NOW)
    assert draws(split) == [(2, 10)]


def test_expired_grants_are_not_drawn() -> None:
    expired = grant(1, 1000, expires_in_days=-1)
    live = grant(2, 100)
    split = split_charge(150, allowance=0, allowance_used=0, grants=[expired, live], now=NOW)
    assert draws(split) == [(2, 100)]
    assert split.overdraft == 50


def test_grant_expiring_exactly_now_is_expired() -> None:
    at_now = OpenGrant(id=1, remaining=100, expires_at=NOW, created_at=NOW - DAY)
    split = split_charge(10, allowance=0, allowance_used=0, grants=[at_now], now=NOW)
    assert draws(split) == []
    assert split.overdraft == 10


def test_grant_expiring_one_microsecond_after_now_is_live() -> None:
    almost = OpenGrant(id=1, remaining=100, expires_at=NOW + timedelta(microseconds=1), created_at=NOW - DAY)
    split = split_charge(10, allowance=0, allowance_used=0, grants=[almost], now=NOW)
    assert draws(split) == [(1, 10)]


def test_empty_grants_are_skipped() -> None:
    split = split_charge(10, allowance=0, allowance_used=0, grants=[grant(1, 0, 1), grant(2, 50, 2)], now=NOW)
    assert draws(split) == [(2, 10)]


def test_cost_exactly_allowance_plus_all_credits_leaves_no_overdraft() -> None:
    grants = [grant(1, 30, expires_in_days=1), grant(2, 70)]
    split = split_charge(200, allowance=150, allowance_used=50, grants=grants, now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (100, [(1, 30), (2, 70)], 0)


def test_one_more_than_everything_is_a_one_token_overdraft() -> None:
    grants = [grant(1, 30, expires_in_days=1), grant(2, 70)]
    split = split_charge(201, allowance=150, allowance_used=50, grants=grants, now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (100, [(1, 30), (2, 70)], 1)


def test_nothing_left_at_all_is_all_overdraft() -> None:
    split = split_charge(42, allowance=100, allowance_used=100, grants=[], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (0, [], 42)


def test_split_always_adds_up_to_the_cost() -> None:
    grants = [grant(1, 17, 3), grant(2, 5), grant(3, 40, -2), grant(4, 9, 1)]
    for cost in range(0, 200, 7):
        for used in (0, 50, 99, 100, 130):
            split = split_charge(cost, allowance=100, allowance_used=used, grants=grants, now=NOW)
            assert split.total == cost
            assert split.allowance >= 0 and split.overdraft >= 0
            assert all(d.amount > 0 for d in split.credits)
            # no grant is drawn beyond what it holds
            held = {g.id: g.remaining for g in grants}
            assert all(d.amount <= held[d.grant_id] for d in split.credits)
            assert 3 not in {d.grant_id for d in split.credits}  # expired


def test_negative_cost_raises() -> None:
    with pytest.raises(ValueError):
        split_charge(-1, allowance=100, allowance_used=0, grants=[], now=NOW)


# -- allowance_used_after -----------------------------------------------------------------------------------


def test_allowance_used_after_adds_allowance_part_and_overdraft_not_credits() -> None:
    split = ChargeSplit(allowance=40, credits=(GrantDraw(1, 25),), overdraft=7)
    assert allowance_used_after(960, split) == 960 + 40 + 7


def test_allowance_used_after_a_real_split_with_overdraft() -> None:
    split = split_charge(150, allowance=100, allowance_used=80, grants=[grant(1, 30)], now=NOW)
    assert (split.allowance, draws(split), split.overdraft) == (20, [(1, 30)], 100)
    assert allowance_used_after(80, split) == 200


def test_allowance_used_after_credit_only_split_is_unchanged() -> None:
    split = split_charge(30, allowance=100, allowance_used=100, grants=[grant(1, 30)], now=NOW)
    assert allowance_used_after(100, split) == 100


# -- spend_order ----------------------------------------------------------------------------------------


def test_spend_order_filters_and_sorts() -> None:
    grants = [
        grant(1, 10),  # never expires, created 10 days ago
        grant(2, 10, expires_in_days=-0.5),  # expired
        grant(3, 0, expires_in_days=1),  # empty
        grant(4, 10, expires_in_days=20),
        grant(5, 10, expires_in_days=3),
        grant(6, 10, created_days_ago=40),  # never expires, older
    ]
    assert [g.id for g in spend_order(grants, NOW)] == [5, 4, 6, 1]


def test_spend_order_of_nothing_is_empty() -> None:
    assert spend_order([], NOW) == []


def test_spend_order_does_not_mutate_the_input() -> None:
    grants = [grant(1, 10), grant(2, 10, expires_in_days=1)]
    before = list(grants)
    spend_order(grants, NOW)
    assert grants == before
