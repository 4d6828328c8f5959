"""What envoyproxy/ratelimit's README says each of its example configurations does, checked against quotagate's
RateLimiter (memory store, a FixedClock, UTC).

Every example file under tests/ratelimit_configs/readme/ is driven with the descriptors the README talks about:
which requests are limited and at which count, nested descriptors taking the limit of the node the last entry
reaches, placeholders without a limit letting requests through, unlimited never limiting (nor touching the
cache), shadow_mode answering OK over its limit, `replaces` dropping the replaced limit, prefix wildcards,
detailed_metric's metric keys, and windows starting over once the unit has passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from quotagate.core.clock import FixedClock
from quotagate.ratelimit.config import load_ratelimit_config, parse_domain
from quotagate.ratelimit.limiter import (
    Code,
    Decision,
    DescriptorStatus,
    Entry,
    RateLimiter,
    RequestDescriptor,
)
from quotagate.ratelimit.model import RateLimit, RateLimitConfig, Unit
from quotagate.ratelimit.store import Counter, MemoryRateLimitStore

README = Path(__file__).parent / "ratelimit_configs" / "readme"
# The first second of a minute (and 11 h 26 min before the next UTC midnight): no window rolls unless a test
# moves the clock.
T0 = datetime(2026, 3, 10, 12, 34, 0, tzinfo=UTC)
SECONDS_TO_MIDNIGHT = 11 * 3600 + 26 * 60
MAX_UINT32 = 4_294_967_295

OK = Code.OK
OVER = Code.OVER_LIMIT

Pair = tuple[str, str]


class SpyStore(MemoryRateLimitStore):
    """The memory store, remembering every counter the limiter asked it to add to."""

    def __init__(self, clock: FixedClock) -> None:
        super().__init__(clock)
        self.counters: list[Counter] = []

    async def increment(self, counters: Sequence[Counter]) -> list[int]:
        self.counters.extend(counters)
        return await super().increment(counters)


@pytest.fixture(scope="module")
def readme_config() -> RateLimitConfig:
    config = load_ratelimit_config([README])
    assert sorted(config.domains) == [
        "edge_proxy_per_ip",
        "example4",
        "example6",
        "example7",
        "example8",
        "example9",
        "internal",
        "messaging",
        "mongo_cps",
        "rl",
    ]
    return config


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def store(clock: FixedClock) -> SpyStore:
    return SpyStore(clock)


@pytest.fixture
def limiter(readme_config: RateLimitConfig, store: SpyStore, clock: FixedClock) -> RateLimiter:
    return RateLimiter(lambda: readme_config, store, clock, ZoneInfo("UTC"))


def desc(*pairs: Pair, hits: int | None = None) -> RequestDescriptor:
    return RequestDescriptor(tuple(Entry(key, value) for key, value in pairs), hits)


async def call(limiter: RateLimiter, domain: str, *descriptors: Sequence[Pair], hits_addend: int = 0) -> Decision:
    decision = await limiter.should_rate_limit(domain, [desc(*d) for d in descriptors], hits_addend)
    assert len(decision.statuses) == len(descriptors)
    over = any(s.code is OVER for s in decision.statuses)
    assert decision.overall_code is (OVER if over else OK)
    return decision


async def check(limiter: RateLimiter, domain: str, *pairs: Pair, hits_addend: int = 0) -> DescriptorStatus:
    """One request with one descriptor; its status (the overall code is the status's code)."""
    decision = await call(limiter, domain, pairs, hits_addend=hits_addend)
    return decision.statuses[0]


async def repeat(limiter: RateLimiter, domain: str, *pairs: Pair, times: int) -> list[DescriptorStatus]:
    return [await check(limiter, domain, *pairs) for _ in range(times)]


def codes(statuses: Sequence[DescriptorStatus]) -> list[Code]:
    return [s.code for s in statuses]


def assert_no_limit(status: DescriptorStatus) -> None:
    assert (status.code, status.limit, status.remaining, status.reset_seconds) == (OK, None, 0, 0)
    assert status.metric_key is None


# -- Example 1: mongo_cps ----------------------------------------------------------------------------------------


async def test_example_1_each_database_gets_500_requests_a_second(limiter: RateLimiter, clock: FixedClock) -> None:
    users = await repeat(limiter, "mongo_cps", ("database", "users"), times=501)
    assert codes(users) == [OK] * 500 + [OVER]
    assert [s.remaining for s in users] == [*range(499, -1, -1), 0]
    assert all(s.limit == RateLimit(Unit.SECOND, 500) for s in users)
    assert all(s.reset_seconds == 1 for s in users)
    # near_limit: past 80% (the 401st to the 500th), not once over.
    assert [s.near_limit for s in users] == [False] * 400 + [True] * 100 + [False]
    assert users[0].metric_key == "mongo_cps.database_users"

    # The other value has a limit of its own, with its own counter.
    default = await check(limiter, "mongo_cps", ("database", "default"))
    assert (default.code, default.remaining, default.limit) == (OK, 499, RateLimit(Unit.SECOND, 500))
    assert default.metric_key == "mongo_cps.database_default"
    # A value that is not configured has no limit at all.
    assert_no_limit(await check(limiter, "mongo_cps", ("database", "orders")))

    clock.advance(1)  # the next second: a new window
    again = await check(limiter, "mongo_cps", ("database", "users"))
    assert (again.code, again.remaining) == (OK, 499)


# -- Example 2: messaging ----------------------------------------------------------------------------------------


async def test_example_2_five_marketing_messages_a_day_per_number(limiter: RateLimiter, clock: FixedClock) -> None:
    marketing = ("message_type", "marketing")
    first = await repeat(limiter, "messaging", marketing, ("to_number", "2061111111"), times=6)
    assert codes(first) == [OK] * 5 + [OVER]
    assert [s.remaining for s in first] == [4, 3, 2, 1, 0, 0]
    assert all(s.limit == RateLimit(Unit.DAY, 5) for s in first)
    assert all(s.reset_seconds == SECONDS_TO_MIDNIGHT for s in first)
    assert first[0].metric_key == "messaging.message_type_marketing.to_number"

    # "to_number" has no value in the config: every number gets its own 5 a day.
    second = await check(limiter, "messaging", marketing, ("to_number", "2062222222"))
    assert (second.code, second.remaining) == (OK, 4)

    # The day is a UTC calendar day here: still over a second before midnight, fresh at midnight.
    clock.set(datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC))
    late = await check(limiter, "messaging", marketing, ("to_number", "2061111111"))
    assert (late.code, late.reset_seconds) == (OVER, 1)
    clock.set(datetime(2026, 3, 11, tzinfo=UTC))
    next_day = await check(limiter, "messaging", marketing, ("to_number", "2061111111"))
    assert (next_day.code, next_day.remaining, next_day.reset_seconds) == (OK, 4, 86400)


async def test_example_2_any_number_gets_100_messages_a_day(limiter: RateLimiter) -> None:
    statuses = await repeat(limiter, "messaging", ("to_number", "2061111111"), times=101)
    assert codes(statuses) == [OK] * 100 + [OVER]
    assert statuses[0].remaining == 99
    assert all(s.limit == RateLimit(Unit.DAY, 100) for s in statuses)
    assert statuses[0].metric_key == "messaging.to_number"
    other = await check(limiter, "messaging", ("to_number", "2062222222"))
    assert (other.code, other.remaining) == (OK, 99)


async def test_example_2_the_placeholder_has_no_limit(limiter: RateLimiter, store: SpyStore) -> None:
    # ("message_type", "marketing") alone reaches a node without a rate_limit: allowed, nothing counted.
    for _ in range(10):
        assert_no_limit(await check(limiter, "messaging", ("message_type", "marketing")))
    # Another message type has no nested "to_number" and no limit of its own.
    assert_no_limit(await check(limiter, "messaging", ("message_type", "transactional"), ("to_number", "206")))
    assert store.counters == []


async def test_example_2_one_request_limits_against_all_matching_rules(limiter: RateLimiter) -> None:
    both = (
        [("message_type", "marketing"), ("to_number", "2063333333")],
        [("to_number", "2063333333")],
    )
    decisions = [await call(limiter, "messaging", *both) for _ in range(6)]
    assert [d.overall_code for d in decisions] == [OK] * 5 + [OVER]  # a logical OR of the two decisions
    last = decisions[-1]
    assert codes(last.statuses) == [OVER, OK]
    assert [s.limit for s in last.statuses] == [RateLimit(Unit.DAY, 5), RateLimit(Unit.DAY, 100)]
    assert last.statuses[1].remaining == 94  # the per-number counter counted all six


# -- Example 3: edge_proxy_per_ip --------------------------------------------------------------------------------


async def test_example_3_every_ip_gets_10_a_second(limiter: RateLimiter, clock: FixedClock) -> None:
    statuses = await repeat(limiter, "edge_proxy_per_ip", ("remote_address", "50.0.0.1"), times=11)
    assert codes(statuses) == [OK] * 10 + [OVER]
    assert [s.remaining for s in statuses] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    assert all(s.limit == RateLimit(Unit.SECOND, 10) for s in statuses)
    other = await check(limiter, "edge_proxy_per_ip", ("remote_address", "50.0.0.2"))
    assert (other.code, other.remaining) == (OK, 9)
    clock.advance(1)
    again = await check(limiter, "edge_proxy_per_ip", ("remote_address", "50.0.0.1"))
    assert (again.code, again.remaining) == (OK, 9)


async def test_example_3_the_blacklisted_ip_takes_the_more_specific_limit_of_0(
    limiter: RateLimiter, clock: FixedClock
) -> None:
    # key/value is tried before the key alone: 50.0.0.5 gets 0 a second, not 10.
    for _ in range(3):
        blocked = await check(limiter, "edge_proxy_per_ip", ("remote_address", "50.0.0.5"))
        assert (blocked.code, blocked.remaining, blocked.limit) == (OVER, 0, RateLimit(Unit.SECOND, 0))
        assert blocked.metric_key == "edge_proxy_per_ip.remote_address_50.0.0.5"
        clock.advance(1)  # not even in a new window


# -- Example 4: example4 -----------------------------------------------------------------------------------------


async def test_example_4_a_two_entry_descriptor_matches_the_nested_config(limiter: RateLimiter) -> None:
    pairs = (("key", "value"), ("subkey", "subvalue"))
    at_limit = await check(limiter, "example4", *pairs, hits_addend=300)
    assert (at_limit.code, at_limit.remaining, at_limit.limit) == (OK, 0, RateLimit(Unit.SECOND, 300))
    over = await check(limiter, "example4", *pairs)
    assert (over.code, over.remaining) == (OVER, 0)
    # "subkey" has no value in the config: another subvalue has its own 300.
    fresh = await check(limiter, "example4", ("key", "value"), ("subkey", "other"))
    assert (fresh.code, fresh.remaining) == (OK, 299)


async def test_example_4_descriptors_of_another_depth_or_value_do_not_match(
    limiter: RateLimiter, store: SpyStore
) -> None:
    assert_no_limit(await check(limiter, "example4", ("key", "value")))  # the first level has no limit
    assert_no_limit(await check(limiter, "example4", ("key", "other"), ("subkey", "subvalue")))
    assert_no_limit(await check(limiter, "example4", ("key", "value"), ("subkey", "subvalue"), ("deeper", "x")))
    assert_no_limit(await check(limiter, "example4", ("subkey", "subvalue")))
    assert store.counters == []


async def test_example_4_a_limit_on_the_first_level_does_not_apply_to_two_entries(
    store: SpyStore, clock: FixedClock
) -> None:
    # The README's configuration that the two-entry request does *not* match.
    domain = parse_domain(
        {
            "domain": "example4",
            "descriptors": [
                {"key": "key", "value": "value", "rate_limit": {"requests_per_unit": 300, "unit": "second"}}
            ],
        },
        "<README example 4, first config>",
    )
    config = RateLimitConfig(domains={"example4": domain})
    limiter = RateLimiter(lambda: config, store, clock, ZoneInfo("UTC"))
    assert_no_limit(await check(limiter, "example4", ("key", "value"), ("subkey", "subvalue")))
    one = await check(limiter, "example4", ("key", "value"))
    assert (one.code, one.remaining, one.limit) == (OK, 299, RateLimit(Unit.SECOND, 300))


# -- Example 5: internal -----------------------------------------------------------------------------------------


async def test_example_5_unlimited_is_never_limited_nor_sent_to_the_cache(
    limiter: RateLimiter, store: SpyStore
) -> None:
    for hits in (0, 1, 1_000_000):
        for _ in range(100):
            status = await check(limiter, "internal", ("ldap", "cn=admin"), hits_addend=hits)
            assert (status.code, status.remaining, status.reset_seconds) == (OK, MAX_UINT32, 0)
            assert status.limit is not None and status.limit.unlimited
            assert status.metric_key == "internal.ldap"  # distinguishable from a descriptor that does not exist
    assert store.counters == []


async def test_example_5_azure_gets_100_a_minute(limiter: RateLimiter, clock: FixedClock) -> None:
    statuses = await repeat(limiter, "internal", ("azure", "tenant-1"), times=101)
    assert codes(statuses) == [OK] * 100 + [OVER]
    assert all(s.limit == RateLimit(Unit.MINUTE, 100) for s in statuses)
    assert all(s.reset_seconds == 60 for s in statuses)
    # With azure over its limit, ldap in the same request is still OK (the overall code is OVER_LIMIT).
    mixed = await call(limiter, "internal", [("ldap", "x")], [("azure", "tenant-1")])
    assert (mixed.overall_code, codes(mixed.statuses)) == (OVER, [OK, OVER])
    clock.advance(59)
    still = await check(limiter, "internal", ("azure", "tenant-1"))
    assert (still.code, still.reset_seconds) == (OVER, 1)
    clock.advance(1)
    again = await check(limiter, "internal", ("azure", "tenant-1"))
    assert (again.code, again.remaining, again.reset_seconds) == (OK, 99, 60)


# -- Example 6: example6 -----------------------------------------------------------------------------------------


async def test_example_6_shadow_mode_reports_ok_over_the_limit(limiter: RateLimiter) -> None:
    pairs = (("service", "auth-service"), ("user", "user-a"))
    statuses = await repeat(limiter, "example6", *pairs, times=50)
    assert codes(statuses) == [OK] * 50  # never limited, regardless of the rate
    assert [s.shadow for s in statuses] == [False] * 10 + [True] * 40  # but the breach of 10/s is known
    assert [s.remaining for s in statuses[:11]] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    assert all(s.limit == RateLimit(Unit.SECOND, 10) for s in statuses)
    # A shadow limit does not hide a real one in the same request.
    mixed = await call(limiter, "example6", pairs, [("service", "auth-service"), ("user", "user-b")], hits_addend=21)
    assert codes(mixed.statuses) == [OK, OVER]
    assert mixed.statuses[0].shadow and mixed.overall_code is OVER


async def test_example_6_user_b_is_limited_to_20_a_second(limiter: RateLimiter, clock: FixedClock) -> None:
    pairs = (("service", "auth-service"), ("user", "user-b"))
    statuses = await repeat(limiter, "example6", *pairs, times=21)
    assert codes(statuses) == [OK] * 20 + [OVER]
    assert all(s.limit == RateLimit(Unit.SECOND, 20) and not s.shadow for s in statuses)
    # "service" has no value in the config: any service, each with its own counter.
    other = await check(limiter, "example6", ("service", "billing"), ("user", "user-b"))
    assert (other.code, other.remaining) == (OK, 19)
    assert_no_limit(await check(limiter, "example6", ("service", "auth-service"), ("user", "user-c")))
    assert_no_limit(await check(limiter, "example6", ("service", "auth-service")))
    clock.advance(1)
    assert (await check(limiter, "example6", *pairs)).code is OK


# -- Example 7: example7 -----------------------------------------------------------------------------------------

SPECIFIC = [("key_1", "value_1"), ("user", "bkthomps")]
REPLACING = [("key_2", "value_2"), ("user", "bkthomps")]
SPECIFIC_LIMIT = RateLimit(Unit.SECOND, 5, name="specific_limit")
REPLACING_LIMIT = RateLimit(Unit.SECOND, 10, replaces=("specific_limit",))


async def test_example_7_each_rule_alone_has_its_own_limit(limiter: RateLimiter) -> None:
    specific = await repeat(limiter, "example7", *SPECIFIC, times=6)
    assert codes(specific) == [OK] * 5 + [OVER]
    assert all(s.limit == SPECIFIC_LIMIT for s in specific)
    replacing = await repeat(limiter, "example7", *REPLACING, times=11)
    assert codes(replacing) == [OK] * 10 + [OVER]
    assert all(s.limit == REPLACING_LIMIT for s in replacing)
    assert_no_limit(await check(limiter, "example7", ("key_1", "value_1"), ("user", "someone-else")))


async def test_example_7_replaces_drops_the_replaced_limit(
    limiter: RateLimiter, store: SpyStore, clock: FixedClock
) -> None:
    decisions = [await call(limiter, "example7", SPECIFIC, REPLACING) for _ in range(11)]
    # 10 a second, not 5: the specific_limit rule was replaced ...
    assert [d.overall_code for d in decisions] == [OK] * 10 + [OVER]
    assert all(d.statuses[0].limit is None and d.statuses[0].code is OK for d in decisions)
    assert all(d.statuses[1].limit == REPLACING_LIMIT for d in decisions)
    assert [d.statuses[1].remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    # ... and its counter was not changed by those 11 requests.
    assert all(c.key.startswith("example7_key_2_value_2_") for c in store.counters)
    alone = await check(limiter, "example7", *SPECIFIC)
    assert (alone.code, alone.remaining, alone.limit) == (OK, 4, SPECIFIC_LIMIT)
    clock.advance(1)
    fresh = await call(limiter, "example7", SPECIFIC, REPLACING)
    assert (fresh.overall_code, fresh.statuses[1].remaining) == (OK, 9)


# -- Example 8: example8 -----------------------------------------------------------------------------------------


async def test_example_8_limits_apply_as_usual(limiter: RateLimiter, clock: FixedClock) -> None:
    first = await repeat(limiter, "example8", ("key1", "unspecified_value"), times=11)
    assert codes(first) == [OK] * 10 + [OVER]
    assert all(s.limit == RateLimit(Unit.MINUTE, 10) for s in first)
    second = await repeat(limiter, "example8", ("key1", "unspecified_value2"), times=11)
    assert codes(second) == [OK] * 10 + [OVER]
    specific = await repeat(limiter, "example8", ("key1", "value1"), times=21)
    assert codes(specific) == [OK] * 20 + [OVER]
    assert all(s.limit == RateLimit(Unit.MINUTE, 20) for s in specific)
    clock.advance(60)
    assert (await check(limiter, "example8", ("key1", "unspecified_value"))).remaining == 9


async def test_example_8_detailed_metric_keys_carry_the_value(limiter: RateLimiter) -> None:
    keys = [
        (await check(limiter, "example8", ("key1", value))).metric_key
        for value in ("unspecified_value", "unspecified_value2", "value1")
    ]
    assert keys == ["example8.key1_unspecified_value", "example8.key1_unspecified_value2", "example8.key1_value1"]


async def test_example_8_without_detailed_metric_values_roll_up_into_the_key(
    store: SpyStore, clock: FixedClock
) -> None:
    domain = parse_domain(
        {
            "domain": "example8",
            "descriptors": [
                {"key": "key1", "rate_limit": {"unit": "minute", "requests_per_unit": 10}},
                {"key": "key1", "value": "value1", "rate_limit": {"unit": "minute", "requests_per_unit": 20}},
            ],
        },
        "<README example 8 without detailed_metric>",
    )
    config = RateLimitConfig(domains={"example8": domain})
    limiter = RateLimiter(lambda: config, store, clock, ZoneInfo("UTC"))
    keys = [
        (await check(limiter, "example8", ("key1", value))).metric_key
        for value in ("unspecified_value", "unspecified_value2", "value1")
    ]
    assert keys == ["example8.key1", "example8.key1", "example8.key1_value1"]


# -- Example 9: example9 -----------------------------------------------------------------------------------------


async def test_example_9_a_trailing_star_matches_by_prefix(limiter: RateLimiter, clock: FixedClock) -> None:
    for value in ("value_1", "value_2"):
        statuses = await repeat(limiter, "example9", ("key1", value), times=21)
        assert codes(statuses) == [OK] * 20 + [OVER], value
        assert all(s.limit == RateLimit(Unit.MINUTE, 20) for s in statuses)
    assert_no_limit(await check(limiter, "example9", ("key1", "valu")))
    assert_no_limit(await check(limiter, "example9", ("key1", "other_value")))
    assert_no_limit(await check(limiter, "example9", ("key2", "value_1")))
    clock.advance(60)
    again = await check(limiter, "example9", ("key1", "value_1"))
    assert (again.code, again.remaining) == (OK, 19)


# -- the README's demo configuration (domain "rl") -----------------------------------------------------------------


async def test_demo_one_header_gets_2_a_minute_and_two_headers_3(limiter: RateLimiter, clock: FixedClock) -> None:
    foo = await repeat(limiter, "rl", ("foo", "foo"), times=3)
    assert codes(foo) == [OK, OK, OVER]
    assert all(s.limit == RateLimit(Unit.MINUTE, 2) for s in foo)
    # The nested, more specific limit applies to the two-entry descriptor, not foo's 2 a minute.
    two = await repeat(limiter, "rl", ("foo", "foo"), ("bar", "bar"), times=4)
    assert codes(two) == [OK, OK, OK, OVER]
    assert all(s.limit == RateLimit(Unit.MINUTE, 3) for s in two)
    clock.advance(60)
    assert [s.remaining for s in await repeat(limiter, "rl", ("foo", "foo"), times=2)] == [1, 0]


async def test_demo_banned_baz_shady_and_unlimited(limiter: RateLimiter, clock: FixedClock) -> None:
    banned = await check(limiter, "rl", ("foo", "foo"), ("bar", "banned"))
    assert (banned.code, banned.limit) == (OVER, RateLimit(Unit.MINUTE, 0))
    baz = await repeat(limiter, "rl", ("foo", "foo"), ("baz", "baz"), times=2)  # "this will be rate limited"
    assert codes(baz) == [OK, OVER]
    assert baz[0].limit == RateLimit(Unit.SECOND, 1)
    not_so_shady = await repeat(limiter, "rl", ("foo", "foo"), ("baz", "not-so-shady"), times=2)
    assert codes(not_so_shady) == [OK, OVER]
    shady = await repeat(limiter, "rl", ("foo", "foo"), ("baz", "shady"), times=5)  # never rate limited
    assert codes(shady) == [OK] * 5
    assert [s.shadow for s in shady] == [False] + [True] * 4
    assert shady[0].limit == RateLimit(Unit.MINUTE, 1)
    for pairs in ([("foo", "foo"), ("bay", "anything")], [("qux", "anything")]):
        statuses = await repeat(limiter, "rl", *pairs, times=5)
        assert codes(statuses) == [OK] * 5
        assert all(s.limit is not None and s.limit.unlimited and s.remaining == MAX_UINT32 for s in statuses)
    clock.advance(1)
    assert (await check(limiter, "rl", ("foo", "foo"), ("baz", "baz"))).code is OK


async def test_demo_source_and_destination_cluster(limiter: RateLimiter) -> None:
    pairs = (("source_cluster", "proxy"), ("destination_cluster", "mock"))
    statuses = await repeat(limiter, "rl", *pairs, times=2)
    assert codes(statuses) == [OK, OVER]
    assert statuses[0].limit == RateLimit(Unit.MINUTE, 1)
    assert_no_limit(await check(limiter, "rl", ("source_cluster", "proxy")))
    assert_no_limit(await check(limiter, "rl", ("source_cluster", "proxy"), ("destination_cluster", "other")))


async def test_unknown_domain_is_allowed_without_a_limit(limiter: RateLimiter, store: SpyStore) -> None:
    decision = await call(limiter, "not_configured", [("database", "users")], [("remote_address", "50.0.0.5")])
    for status in decision.statuses:
        assert_no_limit(status)
    assert store.counters == []
