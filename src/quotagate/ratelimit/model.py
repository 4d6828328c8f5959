"""Plain values of the rate-limit configuration (envoyproxy/ratelimit's YAML format, plus calendar windows and
token-counting limits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Unit(StrEnum):
    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"  # a calendar day in the configured timezone
    MONTH = "month"  # a calendar month in the configured timezone


class Counts(StrEnum):
    REQUESTS = "requests"
    # Hits are tokens: ext_proc adds the tokens each completion used (envoyconf.tokens_descriptor).
    TOKENS = "tokens"


@dataclass(frozen=True)
class RateLimit:
    unit: Unit
    requests_per_unit: int
    name: str = ""
    unlimited: bool = False
    counts: Counts = Counts.REQUESTS
    # Names of other limits this one replaces when both match a request (envoyproxy/ratelimit's `replaces`).
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Descriptor:
    """One node of a domain's descriptor tree: a key, optionally a value, and what applies there."""

    key: str
    value: str | None = None  # None matches any value of the key; "prefix*" matches by prefix
    rate_limit: RateLimit | None = None
    shadow_mode: bool = False
    detailed_metric: bool = False
    descriptors: tuple[Descriptor, ...] = field(default=())


@dataclass(frozen=True)
class Domain:
    domain: str
    descriptors: tuple[Descriptor, ...]
    source: str = ""  # the file it came from


@dataclass(frozen=True)
class RateLimitConfig:
    domains: dict[str, Domain]
