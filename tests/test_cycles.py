"""Cycles are calendar months in the configured timezone, keyed by "YYYY-MM" and reset lazily (DESIGN.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from quotagate.core.clock import FixedClock
from quotagate.core.cycles import cycle_at

SAO_PAULO = ZoneInfo("America/Sao_Paulo")  # UTC-3 all year since 2019
UTC_ZONE = ZoneInfo("UTC")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_last_second_of_november_local_is_still_november() -> None:
    # 2026-11-30 23:59:59 in São Paulo is 2026-12-01 02:59:59 UTC: already December in UTC, not locally.
    at = utc(2026, 12, 1, 2, 59, 59)
    cycle = cycle_at(at, SAO_PAULO)
    assert cycle.key == "2026-11"
    assert cycle.resets_at == utc(2026, 12, 1, 3, 0, 0)
    assert cycle.starts_at == utc(2026, 11, 1, 3, 0, 0)


def test_first_second_of_december_local_is_december() -> None:
    at = datetime(2026, 12, 1, 0, 0, 0, tzinfo=SAO_PAULO)
    assert at.astimezone(UTC) == utc(2026, 12, 1, 3, 0, 0)
    cycle = cycle_at(at, SAO_PAULO)
    assert cycle.key == "2026-12"
    assert cycle.starts_at == utc(2026, 12, 1, 3, 0, 0)
    assert cycle.resets_at == utc(2027, 1, 1, 3, 0, 0)


def test_same_instant_gives_same_cycle_whatever_the_input_offset() -> None:
    local = datetime(2026, 11, 30, 23, 59, 59, tzinfo=SAO_PAULO)
    as_utc = local.astimezone(UTC)
    as_tokyo = local.astimezone(ZoneInfo("Asia/Tokyo"))
    assert cycle_at(local, SAO_PAULO) == cycle_at(as_utc, SAO_PAULO) == cycle_at(as_tokyo, SAO_PAULO)
    assert cycle_at(as_tokyo, SAO_PAULO).key == "2026-11"


def test_fixed_clock_advancing_one_second_across_the_local_boundary_changes_the_cycle() -> None:
    clock = FixedClock(utc(2026, 12, 1, 2, 59, 59))
    before = cycle_at(clock.now(), SAO_PAULO)
    clock.advance(1)
    after = cycle_at(clock.now(), SAO_PAULO)
    assert before.key == "2026-11"
    assert after.key == "2026-12"
    assert before.resets_at == after.starts_at == clock.now()


def test_fixed_clock_within_a_cycle_keeps_the_key() -> None:
    clock = FixedClock(utc(2026, 11, 1, 3, 0, 0))  # first second of November in São Paulo
    first = cycle_at(clock.now(), SAO_PAULO)
    clock.advance(29 * 24 * 3600 + 23 * 3600 + 59 * 60 + 59)  # to 2026-11-30 23:59:59 local
    last = cycle_at(clock.now(), SAO_PAULO)
    assert first == last
    assert first.key == "2026-11"


def test_one_second_before_the_local_month_start_is_the_previous_cycle() -> None:
    clock = FixedClock(utc(2026, 11, 1, 3, 0, 0))
    clock.advance(-1)
    assert cycle_at(clock.now(), SAO_PAULO).key == "2026-10"


def test_december_rolls_over_to_january_of_the_next_year() -> None:
    dec = cycle_at(datetime(2026, 12, 31, 23, 59, 59, tzinfo=SAO_PAULO), SAO_PAULO)
    assert dec.key == "2026-12"
    assert dec.resets_at == utc(2027, 1, 1, 3, 0, 0)
    jan = cycle_at(dec.resets_at, SAO_PAULO)
    assert jan.key == "2027-01"
    assert jan.starts_at == dec.resets_at
    assert jan.resets_at == utc(2027, 2, 1, 3, 0, 0)


def test_new_years_eve_in_utc_is_still_december_in_sao_paulo() -> None:
    # 2027-01-01 01:00 UTC is 2026-12-31 22:00 in São Paulo.
    assert cycle_at(utc(2027, 1, 1, 1, 0, 0), SAO_PAULO).key == "2026-12"
    assert cycle_at(utc(2027, 1, 1, 1, 0, 0), UTC_ZONE).key == "2027-01"


def test_utc_timezone_uses_utc_midnight() -> None:
    cycle = cycle_at(utc(2026, 11, 30, 23, 59, 59), UTC_ZONE)
    assert cycle.key == "2026-11"
    assert cycle.starts_at == utc(2026, 11, 1)
    assert cycle.resets_at == utc(2026, 12, 1)
    assert cycle_at(utc(2026, 12, 1), UTC_ZONE).key == "2026-12"


def test_february_in_a_leap_year_and_not() -> None:
    assert cycle_at(utc(2028, 2, 29, 12), UTC_ZONE).resets_at == utc(2028, 3, 1)
    feb = cycle_at(utc(2027, 2, 15), UTC_ZONE)
    assert feb.resets_at - feb.starts_at == timedelta(days=28)


def test_every_month_of_a_year_is_contiguous_and_ordered() -> None:
    cycle = cycle_at(datetime(2026, 1, 1, tzinfo=SAO_PAULO), SAO_PAULO)
    keys = []
    for _ in range(12):
        keys.append(cycle.key)
        assert cycle.starts_at < cycle.resets_at
        nxt = cycle_at(cycle.resets_at, SAO_PAULO)
        assert nxt.starts_at == cycle.resets_at
        # and the last microsecond before the reset still belongs to this cycle
        assert cycle_at(cycle.resets_at - timedelta(microseconds=1), SAO_PAULO).key == cycle.key
        cycle = nxt
    assert keys == [f"2026-{m:02d}" for m in range(1, 13)]
    assert cycle.key == "2027-01"


def test_zone_with_daylight_saving_uses_local_midnight() -> None:
    # London is UTC+1 in July: the July cycle starts at 2026-06-30 23:00 UTC.
    london = ZoneInfo("Europe/London")
    cycle = cycle_at(utc(2026, 7, 15), london)
    assert cycle.key == "2026-07"
    assert cycle.starts_at == utc(2026, 6, 30, 23)
    assert cycle.resets_at == utc(2026, 7, 31, 23)
    assert cycle_at(utc(2026, 6, 30, 23, 30), london).key == "2026-07"
    assert cycle_at(utc(2026, 6, 30, 22, 59, 59), london).key == "2026-06"


def test_boundaries_are_returned_in_utc() -> None:
    cycle = cycle_at(datetime(2026, 5, 10, tzinfo=timezone(timedelta(hours=5))), SAO_PAULO)
    assert cycle.starts_at.utcoffset() == timedelta(0)
    assert cycle.resets_at.utcoffset() == timedelta(0)


def test_naive_datetime_raises() -> None:
    with pytest.raises(ValueError):
        cycle_at(datetime(2026, 11, 30, 23, 59, 59), SAO_PAULO)


def test_fixed_clock_refuses_naive_datetime() -> None:
    with pytest.raises(ValueError):
        FixedClock(datetime(2026, 11, 30))


def test_fixed_clock_set_moves_the_cycle() -> None:
    clock = FixedClock(utc(2026, 3, 10))
    assert cycle_at(clock.now(), UTC_ZONE).key == "2026-03"
    clock.set(utc(2026, 4, 1))
    assert cycle_at(clock.now(), UTC_ZONE).key == "2026-04"
