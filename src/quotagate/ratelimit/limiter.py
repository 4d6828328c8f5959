"""Envoy's rate-limit decisions, following envoyproxy/ratelimit (the reference service).

The pure part (no Redis, no gRPC):

* `match` walks a domain's descriptor tree like the Go service's `GetLimit` (src/config/config_impl.go): for
  each entry of the request's descriptor, at the current level, the node with the same key and value, else the
  first node with the same key whose value ends in `*` and is a prefix of the entry's value, else the node with
  the key and no value (any value). The limit is the `rate_limit` of the node reached by the *last* entry; a
  descriptor deeper or shallower than the configured tree, or an entry that matches nothing, has no limit.
* `window` gives the fixed window a limit counts in: `now // unit * unit` for second, minute and hour like
  the Go service (src/limiter/cache_key.go, src/utils/utilities.go), and calendar days and months that start
  at local midnight / on the 1st in the configured timezone (quotagate's own units).
* `decide` turns counter values into statuses like `BaseRateLimiter.GetResponseDescriptorStatus`
  (src/limiter/base_limiter.go): over the limit when the count after adding exceeds `requests_per_unit`,
  remaining `limit - count` otherwise, near the limit past 80% of it; shadow-mode limits report but answer OK.

`RateLimiter` ties them to a config provider and a counter store, like `shouldRateLimitWorker` in
src/service/ratelimit.go: unknown domains and unmatched descriptors are OK without a limit, `unlimited` limits
never reach the store, and a named limit that another matched limit `replaces` is dropped.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from quotagate.core.clock import Clock
from quotagate.core.cycles import cycle_at
from quotagate.core.errors import InvalidRequest
from quotagate.ratelimit.model import Descriptor, Domain, RateLimit, RateLimitConfig, Unit
from quotagate.ratelimit.store import Counter, RateLimitStore

# The Go service's default NEAR_LIMIT_RATIO.
NEAR_LIMIT_RATIO = 0.8
# What the Go service answers as limit_remaining for an unlimited descriptor (math.MaxUint32).
UNLIMITED_REMAINING = 2**32 - 1

_FIXED_SECONDS = {Unit.SECOND: 1, Unit.MINUTE: 60, Unit.HOUR: 3600}


class Code(StrEnum):
    OK = "OK"
    OVER_LIMIT = "OVER_LIMIT"


@dataclass(frozen=True)
class Entry:
    key: str
    value: str


@dataclass(frozen=True)
class RequestDescriptor:
    entries: tuple[Entry, ...]
    # The descriptor's own hits_addend; it overrides the request's, and 0 checks without counting.
    hits_addend: int | None = None


@dataclass(frozen=True)
class MatchedLimit:
    rate_limit: RateLimit
    shadow_mode: bool
    detailed_metric: bool
    # The Go service's stats key: the domain and the configured path ("domain.key_value.key"); with
    # detailed_metric, a node that matched by any value or by prefix also carries the request's value.
    metric_key: str
    # The counter key without its window start: "domain_key_value_key_value_" from the request's entries.
    cache_key_prefix: str

    def cache_key(self, window: Window) -> str:
        return f"{self.cache_key_prefix}{window.start_epoch}"


@dataclass(frozen=True)
class Window:
    start_epoch: int  # the window's first second (Unix time)
    reset_seconds: int  # from now until the next window starts (duration_until_reset), at least 1
    ttl_seconds: int  # how long a counter of this window must live: the window's length


@dataclass(frozen=True)
class DescriptorStatus:
    code: Code
    limit: RateLimit | None  # None when no limit applies (no match, unknown domain, replaced)
    remaining: int  # limit_remaining
    reset_seconds: int  # duration_until_reset; 0 when no limit or unlimited
    # True when the limit is in shadow mode and the request went over it: code is OK all the same.
    shadow: bool
    near_limit: bool  # OK, but the count is past NEAR_LIMIT_RATIO of the limit
    metric_key: str | None = None  # the matched limit's metric key, for per-limit stats


@dataclass(frozen=True)
class Decision:
    overall_code: Code  # OVER_LIMIT if any descriptor's status is over its (non-shadow) limit
    statuses: tuple[DescriptorStatus, ...]


@dataclass(frozen=True)
class Counted:
    """A matched limit and what the store said: the counter's value after adding this request's hits."""

    matched: MatchedLimit
    count: int = 0
    reset_seconds: int = 0


# -- matching ------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    descriptor: Descriptor
    metric_key: str
    children: _Level


class _Level:
    """One level of the tree, indexed: exact key/value, prefix wildcards in config order, key only."""

    def __init__(self, descriptors: Sequence[Descriptor], parent_key: str) -> None:
        self.exact: dict[tuple[str, str], _Node] = {}
        self.prefixed: list[tuple[str, str, _Node]] = []
        self.any_value: dict[str, _Node] = {}
        for d in descriptors:
            # Like the Go loader, a descriptor without a value (or with an empty one) is the key alone.
            path = f"{parent_key}{d.key}_{d.value}" if d.value else f"{parent_key}{d.key}"
            node = _Node(d, path, _Level(d.descriptors, path + "."))
            if not d.value:
                self.any_value.setdefault(d.key, node)
            elif d.value.endswith("*"):
                self.prefixed.append((d.key, d.value[:-1], node))
            else:
                self.exact.setdefault((d.key, d.value), node)

    def find(self, entry: Entry) -> _Node | None:
        node = self.exact.get((entry.key, entry.value))
        if node is not None:
            return node
        for key, prefix, candidate in self.prefixed:
            if key == entry.key and entry.value.startswith(prefix):
                return candidate
        return self.any_value.get(entry.key)


_COMPILED: dict[int, tuple[weakref.ref[Domain], _Level]] = {}


def _compiled(domain: Domain) -> _Level:
    """The domain's indexed tree, built once per Domain object (configs are immutable values)."""
    key = id(domain)
    hit = _COMPILED.get(key)
    if hit is not None and hit[0]() is domain:
        return hit[1]
    level = _Level(domain.descriptors, domain.domain + ".")

    def forget(ref: weakref.ref[Domain]) -> None:
        current = _COMPILED.get(key)
        if current is not None and current[0] is ref:
            del _COMPILED[key]

    _COMPILED[key] = (weakref.ref(domain, forget), level)
    return level


def match(domain: Domain, descriptor: RequestDescriptor) -> MatchedLimit | None:
    """The limit that applies to one request descriptor, or None (GetLimit in config_impl.go)."""
    entries = descriptor.entries
    if not entries:
        return None
    level = _compiled(domain)
    node: _Node | None = None
    for entry in entries:
        node = level.find(entry)
        if node is None:
            return None
        level = node.children
    assert node is not None
    found = node.descriptor
    if found.rate_limit is None:
        return None
    metric_key = node.metric_key
    last = entries[-1]
    if found.detailed_metric and (not found.value or found.value.endswith("*")):
        metric_key = f"{metric_key}_{last.value}"
    cache_key_prefix = domain.domain + "_" + "".join(f"{e.key}_{e.value}_" for e in entries)
    return MatchedLimit(
        rate_limit=found.rate_limit,
        shadow_mode=found.shadow_mode,
        detailed_metric=found.detailed_metric,
        metric_key=metric_key,
        cache_key_prefix=cache_key_prefix,
    )


# -- windows -------------------------------------------------------------------------------------------------


def _local_midnight(year: int, month: int, day: int, tz: ZoneInfo) -> int:
    # Where midnight falls in a DST gap, fold=0 takes the offset before the jump, which is the first instant
    # of that day (e.g. 00:00 -03:00 when the clocks go from 00:00 to 01:00 -02:00).
    return int(datetime(year, month, day, tzinfo=tz).timestamp())


def window(limit: RateLimit, now: datetime, tz: ZoneInfo) -> Window:
    """The window `now` falls in for this limit's unit."""
    if now.tzinfo is None:
        raise ValueError("window needs a timezone-aware datetime")
    now_s = math.floor(now.timestamp())
    fixed = _FIXED_SECONDS.get(limit.unit)
    if fixed is not None:
        start = now_s // fixed * fixed
        return Window(start_epoch=start, reset_seconds=start + fixed - now_s, ttl_seconds=fixed)
    if limit.unit is Unit.DAY:
        local = now.astimezone(tz)
        start = _local_midnight(local.year, local.month, local.day, tz)
        following = local.date() + timedelta(days=1)
        end = _local_midnight(following.year, following.month, following.day, tz)
    elif limit.unit is Unit.MONTH:
        cycle = cycle_at(now, tz)
        start = int(cycle.starts_at.timestamp())
        end = int(cycle.resets_at.timestamp())
    else:  # pragma: no cover - every Unit is handled above
        raise ValueError(f"unknown unit {limit.unit!r}")
    return Window(start_epoch=start, reset_seconds=end - now_s, ttl_seconds=end - start)


# -- decisions -----------------------------------------------------------------------------------------------

_NO_LIMIT = DescriptorStatus(code=Code.OK, limit=None, remaining=0, reset_seconds=0, shadow=False, near_limit=False)


def descriptor_status(counted: Counted | None, near_limit_ratio: float = NEAR_LIMIT_RATIO) -> DescriptorStatus:
    """One descriptor's status from its counter (GetResponseDescriptorStatus in base_limiter.go)."""
    if counted is None:
        return _NO_LIMIT
    matched = counted.matched
    limit = matched.rate_limit
    if limit.unlimited:
        return DescriptorStatus(
            code=Code.OK,
            limit=limit,
            remaining=UNLIMITED_REMAINING,
            reset_seconds=0,
            shadow=False,
            near_limit=False,
            metric_key=matched.metric_key,
        )
    allowed = limit.requests_per_unit
    if counted.count > allowed:
        return DescriptorStatus(
            code=Code.OK if matched.shadow_mode else Code.OVER_LIMIT,
            limit=limit,
            remaining=0,
            reset_seconds=counted.reset_seconds,
            shadow=matched.shadow_mode,
            near_limit=False,
            metric_key=matched.metric_key,
        )
    near_threshold = math.floor(allowed * near_limit_ratio)
    return DescriptorStatus(
        code=Code.OK,
        limit=limit,
        remaining=allowed - counted.count,
        reset_seconds=counted.reset_seconds,
        shadow=False,
        near_limit=counted.count > near_threshold,
        metric_key=matched.metric_key,
    )


def decide(counted: Sequence[Counted | None], near_limit_ratio: float = NEAR_LIMIT_RATIO) -> Decision:
    """Statuses in the request's descriptor order (None: no limit applies) and the overall code."""
    statuses = tuple(descriptor_status(c, near_limit_ratio) for c in counted)
    over = any(s.code is Code.OVER_LIMIT for s in statuses)
    return Decision(overall_code=Code.OVER_LIMIT if over else Code.OK, statuses=statuses)


def effective_hits(descriptor: RequestDescriptor, request_hits_addend: int) -> int:
    """GetHitsAddends in utilities.go: the descriptor's own hits_addend (0 allowed: check without counting),
    else the request's, where 0 (unset in proto3) means 1."""
    hits = descriptor.hits_addend if descriptor.hits_addend is not None else max(1, request_hits_addend)
    if hits < 0:
        raise InvalidRequest(f"hits_addend must not be negative, got {hits}")
    return hits


def limits_to_check(domain: Domain, descriptors: Sequence[RequestDescriptor]) -> list[MatchedLimit | None]:
    """Each descriptor's limit, with the limits some other matched limit replaces dropped
    (constructLimitsToCheck in service/ratelimit.go: unlimited limits replace too)."""
    matched = [match(domain, d) for d in descriptors]
    replacing = {name for m in matched if m is not None for name in m.rate_limit.replaces}
    if replacing:
        matched = [None if m is not None and m.rate_limit.name in replacing else m for m in matched]
    return matched


class RateLimiter:
    def __init__(
        self,
        config_provider: Callable[[], RateLimitConfig],
        store: RateLimitStore,
        clock: Clock,
        tz: ZoneInfo,
        *,
        near_limit_ratio: float = NEAR_LIMIT_RATIO,
    ) -> None:
        self._config = config_provider
        self._store = store
        self._clock = clock
        self._tz = tz
        self._near_limit_ratio = near_limit_ratio

    async def should_rate_limit(
        self, domain: str, descriptors: Sequence[RequestDescriptor], hits_addend: int = 0
    ) -> Decision:
        """ShouldRateLimit: every matched, limited descriptor counts its hits in one store call."""
        if not domain:
            raise InvalidRequest("rate limit domain must not be empty")
        if not descriptors:
            raise InvalidRequest("rate limit descriptor list must not be empty")
        if hits_addend < 0:
            raise InvalidRequest(f"hits_addend must not be negative, got {hits_addend}")
        config_domain = self._config().domains.get(domain)
        if config_domain is None:
            return Decision(overall_code=Code.OK, statuses=tuple(_NO_LIMIT for _ in descriptors))
        matched = limits_to_check(config_domain, descriptors)
        now = self._clock.now().astimezone(UTC)
        counters: list[Counter] = []
        pending: list[tuple[int, MatchedLimit, Window]] = []
        counted: list[Counted | None] = [None] * len(descriptors)
        for i, (descriptor, m) in enumerate(zip(descriptors, matched, strict=True)):
            if m is None:
                continue
            if m.rate_limit.unlimited:
                counted[i] = Counted(m)
                continue
            w = window(m.rate_limit, now, self._tz)
            hits = effective_hits(descriptor, hits_addend)
            counters.append(Counter(key=m.cache_key(w), hits=hits, ttl_seconds=w.ttl_seconds))
            pending.append((i, m, w))
        if counters:
            counts = await self._store.increment(counters)
            if len(counts) != len(counters):
                raise RuntimeError(f"rate-limit store answered {len(counts)} counts for {len(counters)} counters")
            for (i, m, w), count in zip(pending, counts, strict=True):
                counted[i] = Counted(m, count=count, reset_seconds=w.reset_seconds)
        return decide(counted, self._near_limit_ratio)
