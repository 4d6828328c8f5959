"""Splitting a cost over the allowance and the credit grants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from quotagate.core.model import ChargeSplit, GrantDraw


@dataclass(frozen=True)
class OpenGrant:
    id: int
    remaining: int
    expires_at: datetime | None
    created_at: datetime


def spend_order(grants: Sequence[OpenGrant], now: datetime) -> list[OpenGrant]:
    """Unexpired grants with something left, earliest-expiring first; grants that never expire last."""
    live = [g for g in grants if g.remaining > 0 and (g.expires_at is None or g.expires_at > now)]
    return sorted(
        live,
        key=lambda g: (g.expires_at is None, g.expires_at or g.created_at, g.created_at, g.id),
    )


def split_charge(
    cost: int, allowance: int, allowance_used: int, grants: Sequence[OpenGrant], now: datetime
) -> ChargeSplit:
    if cost < 0:
        raise ValueError("cost must not be negative")
    from_allowance = min(cost, max(0, allowance - allowance_used))
    rest = cost - from_allowance
    draws: list[GrantDraw] = []
    for grant in spend_order(grants, now):
        if rest == 0:
            break
        take = min(rest, grant.remaining)
        draws.append(GrantDraw(grant.id, take))
        rest -= take
    return ChargeSplit(allowance=from_allowance, credits=tuple(draws), overdraft=rest)


def allowance_used_after(allowance_used: int, split: ChargeSplit) -> int:
    # An overdraft is kept on the allowance counter, so it is paid back by the next grant in the cycle.
    return allowance_used + split.allowance + split.overdraft
