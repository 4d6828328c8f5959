"""Fixed-window counters for the rate limiter: Redis (one Lua script per request) and memory (unit tests).

Importing this module does not import a Redis client: the limiter stays pure, and only RedisRateLimitStore
loads the pipelined connection's script helper when it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from quotagate.core.clock import Clock
from quotagate.core.errors import StoreUnavailable

if TYPE_CHECKING:
    from quotagate.store.resp import PipelinedRedis


@dataclass(frozen=True)
class Counter:
    key: str  # the limiter's cache key ("domain_key_value_..._windowstart"); stores add their own prefix
    hits: int  # added to the counter; 0 only reads it
    ttl_seconds: int  # how long the counter lives after this hit (the window's length)


class RateLimitStore(Protocol):
    async def increment(self, counters: Sequence[Counter]) -> list[int]:
        """Add each counter's hits (in order, all at once) and return the values after adding."""
        ...


def _script_source() -> str:
    return resources.files("quotagate.store").joinpath("lua", "ratelimit.lua").read_text(encoding="utf-8")


class RedisRateLimitStore:
    """All counters of one request in one EVALSHA over quotagate's pipelined connection.

    The script is atomic, so any number of concurrent requests in any number of processes see one order, and
    every counter it creates gets its expiry in the same step (see store/lua/ratelimit.lua).
    """

    def __init__(self, client: PipelinedRedis, prefix: str) -> None:
        from quotagate.store.resp import Script  # the Redis side is loaded only by whoever uses Redis

        self._client = client
        self._prefix = prefix
        self._script = Script(_script_source())

    async def increment(self, counters: Sequence[Counter]) -> list[int]:
        if not counters:
            return []
        keys = [self._prefix + c.key for c in counters]
        args: list[Any] = []
        for c in counters:
            if c.hits < 0:
                raise ValueError(f"hits must not be negative, got {c.hits}")
            if c.ttl_seconds <= 0:
                raise ValueError(f"ttl_seconds must be positive, got {c.ttl_seconds}")
            args += [c.hits, c.ttl_seconds]
        reply = await self._client.evalsha(self._script, keys, args)
        if not isinstance(reply, list) or len(reply) != len(counters):
            raise StoreUnavailable(f"redis: unexpected reply from the rate-limit script: {reply!r}")
        return [int(n) for n in reply]


class MemoryRateLimitStore:
    """Counters in a dict that expire by the injected clock. For tests and single-process use."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._counters: dict[str, tuple[int, float]] = {}  # key -> (count, expires at, Unix time)

    async def increment(self, counters: Sequence[Counter]) -> list[int]:
        now = self._clock.now().timestamp()
        out: list[int] = []
        # No await in here: the whole batch is one step for every other coroutine, as with the Lua script.
        for c in counters:
            if c.hits < 0:
                raise ValueError(f"hits must not be negative, got {c.hits}")
            count, expires = self._counters.get(c.key, (0, now))
            if expires <= now:
                count = 0
                self._counters.pop(c.key, None)
            if c.hits > 0:
                count += c.hits
                self._counters[c.key] = (count, now + c.ttl_seconds)
            out.append(count)
        return out

    def ttl(self, key: str) -> float | None:
        """Seconds until the counter expires, or None if there is none (like Redis TTL, for tests)."""
        entry = self._counters.get(key)
        if entry is None:
            return None
        left = entry[1] - self._clock.now().timestamp()
        return left if left > 0 else None
