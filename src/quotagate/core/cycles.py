"""Calendar cycles: a cycle is a calendar month in the configured timezone.

The cycle key ("2026-11") is derived from the time of each event, so the allowance resets lazily at local
midnight on the 1st without any scheduled job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Cycle:
    key: str
    starts_at: datetime  # inclusive, UTC
    resets_at: datetime  # exclusive, UTC: the start of the next cycle


def cycle_at(at: datetime, tz: ZoneInfo) -> Cycle:
    if at.tzinfo is None:
        raise ValueError("cycle_at needs a timezone-aware datetime")
    local = at.astimezone(tz)
    start_local = datetime(local.year, local.month, 1, tzinfo=tz)
    if local.month == 12:
        next_local = datetime(local.year + 1, 1, 1, tzinfo=tz)
    else:
        next_local = datetime(local.year, local.month + 1, 1, tzinfo=tz)
    return Cycle(
        key=f"{local.year:04d}-{local.month:02d}",
        starts_at=start_local.astimezone(UTC),
        resets_at=next_local.astimezone(UTC),
    )
