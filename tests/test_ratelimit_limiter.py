"""The rate limiter (envoyproxy/ratelimit semantics): matching, windows, decisions, and the counter stores.

The behaviour suite runs against the memory store and a real Redis; every clock is a FixedClock, so no window
rolls during a test unless the test moves the clock.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from quotagate.core.clock import FixedClock
from quotagate.core.errors import InvalidRequest, StoreUnavailable
from quotagate.procs import free_port
from quotagate.ratelimit.limiter import (
    UNLIMITED_REMAINING,
    Code,
    Counted,
    Decision,
    Entry,
    MatchedLimit,
    RateLimiter,
    RequestDescriptor,
    decide,
    match,
    window,
)
from quotagate.ratelimit.model import Counts, Descriptor, Domain, RateLimit, RateLimitConfig, Unit
from quotagate.ratelimit.store import Counter, MemoryRateLimitStore, RateLimitStore, RedisRateLimitStore
from quotagate.store.resp import PipelinedRedis

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
# 12:34:10 UTC: 50 s left in the minute, so nothing rolls over while a test runs.
T0 = datetime(2026, 3, 10, 12, 34, 10, tzinfo=UTC)


def limit(
    unit: Unit,
    n: int,
    *,
    name: str = "",
    unlimited: bool = False,
    counts: Counts = Counts.REQUESTS,
    replaces: tuple[str, ...] = (),
) -> RateLimit:
    return RateLimit(unit, n, name=name, unlimited=unlimited, counts=counts, replaces=replaces)


def d(*pairs: tuple[str, str], hits: int | None = None) -> RequestDescriptor:
    return RequestDescriptor(tuple(Entry(k, v) for k, v in pairs), hits)


def epoch(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


# -- matching ------------------------------------------------------------------------------------------------

EDGE = Domain(
    domain="edge",
    descriptors=(
        Descriptor("remote_address", rate_limit=limit(Unit.SECOND, 10)),
        Descriptor("remote_address", "50.0.0.5", rate_limit=limit(Unit.SECOND, 0)),
        Descriptor("path", rate_limit=limit(Unit.MINUTE, 5)),
        Descriptor("path", "/api/*", rate_limit=limit(Unit.MINUTE, 20)),
        Descriptor("path", "/api/admin*", rate_limit=limit(Unit.MINUTE, 1)),  # after /api/*: never reached
        Descriptor(
            "message_type",
            "marketing",
            descriptors=(Descriptor("to_number", rate_limit=limit(Unit.DAY, 5)),),
        ),
        Descriptor("to_number", rate_limit=limit(Unit.DAY, 100), detailed_metric=True),
        Descriptor(
            "tenant",
            descriptors=(
                Descriptor("model", "gpt-*", rate_limit=limit(Unit.MINUTE, 7, counts=Counts.TOKENS)),
                Descriptor("model", rate_limit=limit(Unit.MINUTE, 3)),
            ),
            rate_limit=limit(Unit.HOUR, 1000),
        ),
        Descriptor("service", descriptors=(Descriptor("user", "user-a", shadow_mode=True),)),
    ),
)


def test_exact_value_wins_over_the_key_alone() -> None:
    m = match(EDGE, d(("remote_address", "50.0.0.5")))
    assert m is not None
    assert m.rate_limit.requests_per_unit == 0
    assert m.metric_key == "edge.remote_address_50.0.0.5"
    assert m.cache_key_prefix == "edge_remote_address_50.0.0.5_"


def test_key_without_value_matches_any_value_with_a_counter_per_value() -> None:
    a = match(EDGE, d(("remote_address", "10.0.0.1")))
    b = match(EDGE, d(("remote_address", "10.0.0.2")))
    assert a is not None and b is not None
    assert a.rate_limit == b.rate_limit == limit(Unit.SECOND, 10)
    assert a.metric_key == b.metric_key == "edge.remote_address"  # rolled up, like the Go service's stats
    assert a.cache_key_prefix == "edge_remote_address_10.0.0.1_"
    assert b.cache_key_prefix == "edge_remote_address_10.0.0.2_"


def test_trailing_star_is_a_prefix_match_tried_before_the_key_alone() -> None:
    api = match(EDGE, d(("path", "/api/users")))
    assert api is not None and api.rate_limit.requests_per_unit == 20
    assert api.metric_key == "edge.path_/api/*"
    assert api.cache_key_prefix == "edge_path_/api/users_"
    # The first matching wildcard in config order wins, as in GetLimit's loop over wildcardKeys.
    admin = match(EDGE, d(("path", "/api/admin/x")))
    assert admin is not None and admin.rate_limit.requests_per_unit == 20
    other = match(EDGE, d(("path", "/web")))
    assert other is not None and other.rate_limit.requests_per_unit == 5


def test_nested_descriptors_match_entry_by_entry() -> None:
    m = match(EDGE, d(("message_type", "marketing"), ("to_number", "2061111111")))
    assert m is not None
    assert m.rate_limit == limit(Unit.DAY, 5)
    assert m.metric_key == "edge.message_type_marketing.to_number"
    assert m.cache_key_prefix == "edge_message_type_marketing_to_number_2061111111_"


def test_wildcards_work_at_nested_levels_too() -> None:
    gpt = match(EDGE, d(("tenant", "acme"), ("model", "gpt-4o")))
    assert gpt is not None and gpt.rate_limit.requests_per_unit == 7
    assert gpt.rate_limit.counts is Counts.TOKENS
    other = match(EDGE, d(("tenant", "acme"), ("model", "claude")))
    assert other is not None and other.rate_limit.requests_per_unit == 3


def test_the_limit_is_the_one_at_the_node_of_the_last_entry() -> None:
    # (tenant) alone stops at the tenant node, which has its own limit.
    tenant = match(EDGE, d(("tenant", "acme")))
    assert tenant is not None and tenant.rate_limit.requests_per_unit == 1000
    # A partial descriptor whose node has no limit of its own: no limit.
    assert match(EDGE, d(("message_type", "marketing"))) is None
    # A node without rate_limit at the end of the walk: no limit (the config whitelists it).
    assert match(EDGE, d(("service", "auth"), ("user", "user-a"))) is None
    # Deeper than the tree: no limit, although the first entry alone would have one.
    assert match(EDGE, d(("remote_address", "10.0.0.1"), ("path", "/x"))) is None


def test_unknown_keys_and_values_have_no_limit() -> None:
    assert match(EDGE, d(("nope", "x"))) is None
    assert match(EDGE, d(("message_type", "transactional"), ("to_number", "1"))) is None
    assert match(EDGE, d(("message_type", "marketing"), ("from_number", "1"))) is None
    assert match(EDGE, RequestDescriptor((), None)) is None


def test_detailed_metric_carries_the_value_of_an_any_value_match() -> None:
    m = match(EDGE, d(("to_number", "2061111111")))
    assert m is not None and m.detailed_metric
    assert m.metric_key == "edge.to_number_2061111111"


def test_node_flags_come_with_the_match() -> None:
    domain = Domain(
        "flags",
        (Descriptor("k", "v", rate_limit=limit(Unit.MINUTE, 1), shadow_mode=True),),
    )
    m = match(domain, d(("k", "v")))
    assert m is not None and m.shadow_mode and not m.detailed_metric


# -- windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "start", "reset", "ttl"),
    [
        (Unit.SECOND, epoch(2026, 3, 10, 12, 34, 56), 1, 1),
        (Unit.MINUTE, epoch(2026, 3, 10, 12, 34), 4, 60),
        (Unit.HOUR, epoch(2026, 3, 10, 12), 3600 - (34 * 60 + 56), 3600),
    ],
)
def test_fixed_windows_are_epoch_aligned(unit: Unit, start: int, reset: int, ttl: int) -> None:
    now = datetime(2026, 3, 10, 12, 34, 56, 700_000, tzinfo=UTC)
    w = window(limit(unit, 1), now, SAO_PAULO)  # the timezone does not move fixed windows
    assert (w.start_epoch, w.reset_seconds, w.ttl_seconds) == (start, reset, ttl)


def test_a_fixed_window_is_whole_at_its_first_second() -> None:
    w = window(limit(Unit.MINUTE, 1), datetime(2026, 3, 10, 12, 35, tzinfo=UTC), SAO_PAULO)
    assert (w.start_epoch, w.reset_seconds) == (epoch(2026, 3, 10, 12, 35), 60)


def test_day_window_starts_at_local_midnight() -> None:
    # Sao Paulo is UTC-3: local midnight is 03:00 UTC.
    last_second = window(limit(Unit.DAY, 1), datetime(2026, 3, 1, 2, 59, 59, tzinfo=UTC), SAO_PAULO)
    assert last_second.start_epoch == epoch(2026, 2, 28, 3)
    assert (last_second.reset_seconds, last_second.ttl_seconds) == (1, 86400)
    first_second = window(limit(Unit.DAY, 1), datetime(2026, 3, 1, 3, tzinfo=UTC), SAO_PAULO)
    assert first_second.start_epoch == epoch(2026, 3, 1, 3)
    assert (first_second.reset_seconds, first_second.ttl_seconds) == (86400, 86400)


def test_day_window_on_a_dst_day_is_23_hours() -> None:
    # 2018-11-04 in Sao Paulo: clocks went from 00:00 -03:00 to 01:00 -02:00, so the day began at 03:00 UTC.
    w = window(limit(Unit.DAY, 1), datetime(2018, 11, 4, 12, tzinfo=UTC), SAO_PAULO)
    assert w.start_epoch == epoch(2018, 11, 4, 3)
    assert w.ttl_seconds == 23 * 3600
    assert w.reset_seconds == epoch(2018, 11, 5, 2) - epoch(2018, 11, 4, 12)


def test_month_window_starts_on_the_first_at_local_midnight() -> None:
    end_of_february = window(limit(Unit.MONTH, 1), datetime(2026, 3, 1, 2, 59, 59, tzinfo=UTC), SAO_PAULO)
    assert end_of_february.start_epoch == epoch(2026, 2, 1, 3)
    assert (end_of_february.reset_seconds, end_of_february.ttl_seconds) == (1, 28 * 86400)
    start_of_march = window(limit(Unit.MONTH, 1), datetime(2026, 3, 1, 3, tzinfo=UTC), SAO_PAULO)
    assert start_of_march.start_epoch == epoch(2026, 3, 1, 3)
    assert (start_of_march.reset_seconds, start_of_march.ttl_seconds) == (31 * 86400, 31 * 86400)
    december = window(limit(Unit.MONTH, 1), datetime(2026, 12, 31, 12, tzinfo=UTC), SAO_PAULO)
    assert december.start_epoch == epoch(2026, 12, 1, 3)
    assert december.reset_seconds == epoch(2027, 1, 1, 3) - epoch(2026, 12, 31, 12)


def test_window_needs_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window(limit(Unit.MINUTE, 1), datetime(2026, 3, 10, 12), SAO_PAULO)


# -- decide (pure) -------------------------------------------------------------------------------------------


def matched(rate_limit: RateLimit, *, shadow: bool = False) -> MatchedLimit:
    return MatchedLimit(rate_limit, shadow, False, "d.k", "d_k_v_")


def test_decide_thresholds() -> None:
    ten = matched(limit(Unit.MINUTE, 10))
    decision = decide([Counted(ten, 8, 30), Counted(ten, 9, 30), Counted(ten, 10, 30), Counted(ten, 11, 30), None])
    near = [(s.code, s.remaining, s.near_limit) for s in decision.statuses]
    assert near == [
        (Code.OK, 2, False),  # 8 is not past floor(10 * 0.8)
        (Code.OK, 1, True),
        (Code.OK, 0, True),  # at the limit is still OK: over means count > requests_per_unit
        (Code.OVER_LIMIT, 0, False),
        (Code.OK, 0, False),
    ]
    assert decision.statuses[0].reset_seconds == 30 and decision.statuses[0].metric_key == "d.k"
    assert decision.statuses[4].limit is None
    assert decision.overall_code is Code.OVER_LIMIT


def test_decide_shadow_over_is_ok_and_flagged() -> None:
    decision = decide([Counted(matched(limit(Unit.MINUTE, 1), shadow=True), 2, 5)])
    status = decision.statuses[0]
    assert (status.code, status.shadow, status.remaining) == (Code.OK, True, 0)
    assert decision.overall_code is Code.OK


def test_decide_near_limit_ratio_is_configurable() -> None:
    ten = matched(limit(Unit.MINUTE, 10))
    assert not decide([Counted(ten, 6, 1)]).statuses[0].near_limit
    assert decide([Counted(ten, 6, 1)], near_limit_ratio=0.5).statuses[0].near_limit


# -- the behaviour suite: memory and Redis -------------------------------------------------------------------

API = Domain(
    domain="api",
    descriptors=(
        Descriptor("user", rate_limit=limit(Unit.MINUTE, 3)),
        Descriptor("ten", rate_limit=limit(Unit.MINUTE, 10)),
        Descriptor("tokens", rate_limit=limit(Unit.MINUTE, 1000, counts=Counts.TOKENS)),
        Descriptor("internal", rate_limit=limit(Unit.MINUTE, 0, unlimited=True)),
        Descriptor("soft", rate_limit=limit(Unit.MINUTE, 1), shadow_mode=True),
        Descriptor("daily", rate_limit=limit(Unit.DAY, 2)),
        Descriptor(
            "key_1",
            "value_1",
            descriptors=(Descriptor("user", "bk", rate_limit=limit(Unit.MINUTE, 1, name="specific_limit")),),
        ),
        Descriptor(
            "key_2",
            "value_2",
            descriptors=(Descriptor("user", "bk", rate_limit=limit(Unit.MINUTE, 10, replaces=("specific_limit",))),),
        ),
        Descriptor("open", "door"),
    ),
)
CONFIG = RateLimitConfig(domains={"api": API})


class SpyStore:
    """Records what the limiter asks of the real store."""

    def __init__(self, inner: RateLimitStore) -> None:
        self.inner = inner
        self.calls: list[list[Counter]] = []

    async def increment(self, counters: Sequence[Counter]) -> list[int]:
        self.calls.append(list(counters))
        return await self.inner.increment(counters)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for memory, (url, key prefix) for Redis. A plain fixture, so it may pull the async ones."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


@pytest.fixture
async def store(backend: tuple[str, str] | None, clock: FixedClock) -> AsyncIterator[SpyStore]:
    if backend is None:
        yield SpyStore(MemoryRateLimitStore(clock))
        return
    url, prefix = backend
    client = PipelinedRedis(url)
    try:
        yield SpyStore(RedisRateLimitStore(client, prefix))
    finally:
        client.close()


@pytest.fixture
def limiter(store: SpyStore, clock: FixedClock) -> RateLimiter:
    return RateLimiter(lambda: CONFIG, store, clock, SAO_PAULO)


def codes(decision: Decision) -> list[Code]:
    return [s.code for s in decision.statuses]


async def test_counts_up_to_the_limit_then_denies(limiter: RateLimiter) -> None:
    seen = []
    for _ in range(4):
        decision = await limiter.should_rate_limit("api", [d(("user", "alice"))], 0)
        s = decision.statuses[0]
        seen.append((decision.overall_code, s.code, s.remaining, s.reset_seconds))
    assert seen == [
        (Code.OK, Code.OK, 2, 50),
        (Code.OK, Code.OK, 1, 50),
        (Code.OK, Code.OK, 0, 50),
        (Code.OVER_LIMIT, Code.OVER_LIMIT, 0, 50),
    ]
    assert decision.statuses[0].limit == limit(Unit.MINUTE, 3)
    # Another value of the key has its own counter.
    bob = await limiter.should_rate_limit("api", [d(("user", "bob"))], 0)
    assert (bob.overall_code, bob.statuses[0].remaining) == (Code.OK, 2)


async def test_the_next_window_starts_from_zero(limiter: RateLimiter, clock: FixedClock) -> None:
    for _ in range(4):
        await limiter.should_rate_limit("api", [d(("user", "alice"))], 0)
    clock.advance(49)  # 12:34:59, still the same minute
    late = await limiter.should_rate_limit("api", [d(("user", "alice"))], 0)
    assert (late.overall_code, late.statuses[0].reset_seconds) == (Code.OVER_LIMIT, 1)
    clock.advance(1)  # 12:35:00
    fresh = await limiter.should_rate_limit("api", [d(("user", "alice"))], 0)
    assert (fresh.overall_code, fresh.statuses[0].remaining, fresh.statuses[0].reset_seconds) == (Code.OK, 2, 60)


async def test_request_hits_addend_counts_that_many_and_zero_means_one(limiter: RateLimiter) -> None:
    five = await limiter.should_rate_limit("api", [d(("ten", "x"))], 5)
    assert five.statuses[0].remaining == 5
    unset = await limiter.should_rate_limit("api", [d(("ten", "x"))], 0)
    assert unset.statuses[0].remaining == 4


async def test_descriptor_hits_addend_overrides_the_request(limiter: RateLimiter) -> None:
    decision = await limiter.should_rate_limit("api", [d(("ten", "x"), hits=3), d(("ten", "y"))], 5)
    assert [s.remaining for s in decision.statuses] == [7, 5]


async def test_descriptor_hits_addend_zero_checks_without_counting(limiter: RateLimiter) -> None:
    check = await limiter.should_rate_limit("api", [d(("ten", "x"), hits=0)], 5)
    assert (check.overall_code, check.statuses[0].remaining) == (Code.OK, 10)
    full = await limiter.should_rate_limit("api", [d(("ten", "x"))], 10)
    assert (full.overall_code, full.statuses[0].remaining) == (Code.OK, 0)
    for _ in range(3):  # checking at the limit neither denies nor counts
        again = await limiter.should_rate_limit("api", [d(("ten", "x"), hits=0)], 10)
        assert (again.overall_code, again.statuses[0].remaining) == (Code.OK, 0)
    over = await limiter.should_rate_limit("api", [d(("ten", "x"))], 1)
    assert over.overall_code is Code.OVER_LIMIT
    still_over = await limiter.should_rate_limit("api", [d(("ten", "x"), hits=0)], 1)
    assert still_over.overall_code is Code.OVER_LIMIT


async def test_token_hits_over_the_limit_deny_at_once(limiter: RateLimiter) -> None:
    ok = await limiter.should_rate_limit("api", [d(("tokens", "t"))], 999)
    assert (ok.overall_code, ok.statuses[0].remaining, ok.statuses[0].near_limit) == (Code.OK, 1, True)
    over = await limiter.should_rate_limit("api", [d(("tokens", "t"))], 2)
    assert over.overall_code is Code.OVER_LIMIT


async def test_unlimited_never_limits_nor_counts(limiter: RateLimiter, store: SpyStore) -> None:
    for _ in range(5):
        decision = await limiter.should_rate_limit("api", [d(("internal", "svc"))], 1000)
        s = decision.statuses[0]
        assert (decision.overall_code, s.code, s.remaining) == (Code.OK, Code.OK, UNLIMITED_REMAINING)
        assert s.limit is not None and s.limit.unlimited
    assert store.calls == []


async def test_shadow_mode_counts_and_reports_but_never_denies(limiter: RateLimiter) -> None:
    first = await limiter.should_rate_limit("api", [d(("soft", "s"))], 0)
    assert (first.statuses[0].code, first.statuses[0].shadow, first.statuses[0].remaining) == (Code.OK, False, 0)
    second = await limiter.should_rate_limit("api", [d(("soft", "s"))], 0)
    s = second.statuses[0]
    assert (second.overall_code, s.code, s.shadow, s.remaining) == (Code.OK, Code.OK, True, 0)
    # A non-shadow limit in the same request still denies.
    mixed = await limiter.should_rate_limit("api", [d(("soft", "s")), d(("user", "u"))], 4)
    assert codes(mixed) == [Code.OK, Code.OVER_LIMIT]
    assert mixed.statuses[0].shadow and mixed.overall_code is Code.OVER_LIMIT


async def test_replaces_drops_the_replaced_limit(limiter: RateLimiter, store: SpyStore) -> None:
    both = [d(("key_1", "value_1"), ("user", "bk")), d(("key_2", "value_2"), ("user", "bk"))]
    for i in range(3):  # the replaced 1/min limit would deny the second call
        decision = await limiter.should_rate_limit("api", both, 0)
        assert decision.overall_code is Code.OK
        assert decision.statuses[0].limit is None
        assert decision.statuses[1].limit == limit(Unit.MINUTE, 10, replaces=("specific_limit",))
        assert decision.statuses[1].remaining == 9 - i
    assert all(len(call) == 1 for call in store.calls)  # the replaced counter was never touched
    alone = await limiter.should_rate_limit("api", both[:1], 0)
    assert (alone.overall_code, alone.statuses[0].remaining) == (Code.OK, 0)
    assert (await limiter.should_rate_limit("api", both[:1], 0)).overall_code is Code.OVER_LIMIT


async def test_near_limit_past_eighty_percent(limiter: RateLimiter) -> None:
    near = []
    for _ in range(11):
        decision = await limiter.should_rate_limit("api", [d(("ten", "n"))], 0)
        near.append(decision.statuses[0].near_limit)
    assert near == [False] * 8 + [True, True, False]  # the 11th is over, not near


async def test_unknown_domain_is_ok_without_limits(limiter: RateLimiter, store: SpyStore) -> None:
    decision = await limiter.should_rate_limit("nope", [d(("user", "alice")), d(("ten", "x"))], 0)
    assert decision.overall_code is Code.OK
    assert [(s.code, s.limit) for s in decision.statuses] == [(Code.OK, None), (Code.OK, None)]
    assert store.calls == []


async def test_unmatched_descriptors_are_ok_without_a_limit(limiter: RateLimiter, store: SpyStore) -> None:
    descriptors = [d(("nope", "x")), d(("open", "door")), d(("user", "alice"))]
    decision = await limiter.should_rate_limit("api", descriptors, 0)
    assert [(s.code, s.limit is None) for s in decision.statuses] == [
        (Code.OK, True),
        (Code.OK, True),
        (Code.OK, False),
    ]
    assert [[c.hits for c in call] for call in store.calls] == [[1]]


async def test_all_counters_of_a_request_go_in_one_store_call(limiter: RateLimiter, store: SpyStore) -> None:
    descriptors = [d(("user", "alice")), d(("ten", "x"), hits=4), d(("user", "alice"))]
    decision = await limiter.should_rate_limit("api", descriptors, 2)
    assert len(store.calls) == 1
    assert [(c.key, c.hits, c.ttl_seconds) for c in store.calls[0]] == [
        (f"api_user_alice_{epoch(2026, 3, 10, 12, 34)}", 2, 60),
        (f"api_ten_x_{epoch(2026, 3, 10, 12, 34)}", 4, 60),
        (f"api_user_alice_{epoch(2026, 3, 10, 12, 34)}", 2, 60),
    ]
    # The same counter twice counts twice, in order.
    assert [s.remaining for s in decision.statuses] == [1, 6, 0]


async def test_day_limit_resets_at_local_midnight(limiter: RateLimiter, clock: FixedClock) -> None:
    clock.set(datetime(2026, 3, 11, 2, 59, tzinfo=UTC))  # 23:59 on March 10th in Sao Paulo
    for expected in (Code.OK, Code.OK, Code.OVER_LIMIT):
        decision = await limiter.should_rate_limit("api", [d(("daily", "x"))], 0)
        assert decision.overall_code is expected
    assert decision.statuses[0].reset_seconds == 60
    clock.advance(60)  # local midnight
    fresh = await limiter.should_rate_limit("api", [d(("daily", "x"))], 0)
    assert (fresh.overall_code, fresh.statuses[0].remaining, fresh.statuses[0].reset_seconds) == (
        Code.OK,
        1,
        86400,
    )


async def test_bad_requests_are_refused(limiter: RateLimiter, store: SpyStore) -> None:
    with pytest.raises(InvalidRequest, match="domain"):
        await limiter.should_rate_limit("", [d(("user", "a"))], 0)
    with pytest.raises(InvalidRequest, match="descriptor"):
        await limiter.should_rate_limit("api", [], 0)
    with pytest.raises(InvalidRequest, match="negative"):
        await limiter.should_rate_limit("api", [d(("user", "a"), hits=-1)], 0)
    assert store.calls == []


async def test_config_changes_apply_to_the_next_call(store: SpyStore, clock: FixedClock) -> None:
    current = {"config": CONFIG}
    limiter = RateLimiter(lambda: current["config"], store, clock, SAO_PAULO)
    assert (await limiter.should_rate_limit("api", [d(("user", "a"))], 0)).statuses[0].remaining == 2
    strict = Domain("api", (Descriptor("user", rate_limit=limit(Unit.MINUTE, 1)),))
    current["config"] = RateLimitConfig(domains={"api": strict})
    # Same window, same counter key: the count so far (1) already uses up the new limit of 1.
    assert (await limiter.should_rate_limit("api", [d(("user", "a"))], 0)).overall_code is Code.OVER_LIMIT


# -- Redis only ----------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisRateLimitStore]:
    client = PipelinedRedis(redis_url)
    try:
        yield RedisRateLimitStore(client, redis_prefix)
    finally:
        client.close()


async def test_concurrent_requests_let_exactly_the_limit_through(
    redis_store: RedisRateLimitStore, redis_url: str, redis_prefix: str
) -> None:
    domain = Domain("burst", (Descriptor("client", rate_limit=limit(Unit.MINUTE, 100)),))
    limiter = RateLimiter(lambda: RateLimitConfig({"burst": domain}), redis_store, FixedClock(T0), SAO_PAULO)
    decisions = await asyncio.gather(
        *(limiter.should_rate_limit("burst", [d(("client", "c1"))], 0) for _ in range(500))
    )
    assert sum(1 for x in decisions if x.overall_code is Code.OK) == 100
    assert sum(1 for x in decisions if x.overall_code is Code.OVER_LIMIT) == 400
    assert sorted(x.statuses[0].remaining for x in decisions if x.overall_code is Code.OK) == list(range(100))
    plain = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # Over-limit hits count too, as in the Go service.
        assert await plain.get(f"{redis_prefix}burst_client_c1_{epoch(2026, 3, 10, 12, 34)}") == "500"
    finally:
        await plain.aclose()


async def test_redis_counters_carry_a_ttl(redis_store: RedisRateLimitStore, redis_url: str, redis_prefix: str) -> None:
    limiter = RateLimiter(lambda: CONFIG, redis_store, FixedClock(T0), SAO_PAULO)
    await limiter.should_rate_limit("api", [d(("user", "alice")), d(("daily", "x"))], 0)
    plain = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted([k async for k in plain.scan_iter(match=redis_prefix + "*")])
        assert keys == sorted(
            [
                f"{redis_prefix}api_user_alice_{epoch(2026, 3, 10, 12, 34)}",
                f"{redis_prefix}api_daily_x_{epoch(2026, 3, 10, 3)}",
            ]
        )
        ttls = {k: await plain.ttl(k) for k in keys}
        assert 0 < ttls[f"{redis_prefix}api_user_alice_{epoch(2026, 3, 10, 12, 34)}"] <= 60
        assert 60 < ttls[f"{redis_prefix}api_daily_x_{epoch(2026, 3, 10, 3)}"] <= 86400
    finally:
        await plain.aclose()


async def test_a_zero_hit_read_creates_no_key(
    redis_store: RedisRateLimitStore, redis_url: str, redis_prefix: str
) -> None:
    assert await redis_store.increment([Counter("k", 0, 60), Counter("k", 2, 60), Counter("j", 0, 60)]) == [0, 2, 0]
    plain = aioredis.Redis.from_url(redis_url)
    try:
        assert await plain.exists(redis_prefix + "k") == 1
        assert await plain.exists(redis_prefix + "j") == 0
    finally:
        await plain.aclose()


async def test_unreachable_redis_is_store_unavailable() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RateLimiter(lambda: CONFIG, RedisRateLimitStore(client, "x:"), FixedClock(T0), SAO_PAULO)
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.should_rate_limit("api", [d(("user", "alice"))], 0)
    finally:
        client.close()


# -- memory only ---------------------------------------------------------------------------------------------


async def test_memory_counters_expire_by_the_injected_clock(clock: FixedClock) -> None:
    store = MemoryRateLimitStore(clock)
    assert await store.increment([Counter("k", 3, 60)]) == [3]
    clock.advance(59)
    assert store.ttl("k") == pytest.approx(1)
    assert await store.increment([Counter("k", 0, 60)]) == [3]
    clock.advance(1)
    assert store.ttl("k") is None
    assert await store.increment([Counter("k", 0, 60)]) == [0]
    assert await store.increment([Counter("k", 1, 60)]) == [1]


# -- layout --------------------------------------------------------------------------------------------------


def test_the_limiter_imports_no_redis_or_grpc() -> None:
    code = (
        "import sys, quotagate.ratelimit.limiter, quotagate.ratelimit.store\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis', 'grpc', 'google'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
