"""What one decision-port process and each of its connections may take from a peer, and how hits are reported.

Pure: no config files, no prometheus, no clock of its own. `DecisionLimits` holds the operator's settings
(config.py's `decision:` section) and the fixed flood budgets; `Budget` is a token bucket over an injected
clock; `Observer` is what the composition root hands in to count hits (server.py implements it over Metrics);
`CauseLog` keeps a flood from turning into a log line per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class FloodBudgets:
    """Token buckets per connection: (events per second, burst). Past one: GOAWAY ENHANCE_YOUR_CALM."""

    pings: tuple[float, float] = (50.0, 200.0)  # PINGs that need an ACK
    settings: tuple[float, float] = (10.0, 50.0)  # SETTINGS that need an ACK
    empty_frames: tuple[float, float] = (20.0, 200.0)  # empty/tiny DATA or CONTINUATION that end nothing
    resets: tuple[float, float] = (200.0, 1000.0)  # streams the client cancels before their answer
    stream_errors: tuple[float, float] = (20.0, 100.0)  # RST_STREAMs we owe for the peer's frames on closed streams
    tiny_frame_bytes: int = 16  # a CONTINUATION shorter than this that does not end its block counts as empty
    max_table_size_updates: int = 2  # RFC 7541 4.2: at most two, at the start of a block
    # A header block this much larger than what it decodes to (and over `bomb_floor` bytes) is a bomb.
    bomb_ratio: int = 2
    bomb_floor: int = 1024


@dataclass(frozen=True, slots=True)
class DecisionLimits:
    """The `decision:` settings (defaults here; config.py reads them)."""

    max_connections: int = 512
    max_concurrent_streams: int = 1000
    max_header_list_bytes: int = 16384
    max_message_bytes: int = 8 << 20
    max_buffered_in_bytes: int = 16 << 20
    max_buffered_out_bytes: int = 1 << 20
    idle_timeout_seconds: float = 300.0
    header_read_timeout_seconds: float = 10.0
    floods: FloodBudgets = field(default_factory=FloodBudgets)

    @property
    def max_header_block_bytes(self) -> int:
        """The encoded block accepted (padding stripped): an encoded field is never much larger than its
        decoded size (which counts 32 bytes a field), so more than this is junk or too large anyway."""
        return 2 * self.max_header_list_bytes + 1024


@dataclass(frozen=True, slots=True)
class DecisionTls:
    """`decision.tls`: the decision port's certificate and key (PEM), and with `client_ca` mutual TLS: every
    peer must show a certificate that CA signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class Budget:
    """A token bucket: `burst` events at once, refilled at `rate` a second. spend() is False once it is empty."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._last = clock()

    def spend(self, cost: float = 1.0) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True


class Observer(Protocol):
    """What the unary server reports; the composition root counts it (server.py, over Metrics)."""

    def limit_hit(self, limit: str) -> None: ...

    def closed_for_cause(self, cause: str) -> None: ...

    def connections(self, open_connections: int) -> None: ...


class NullObserver:
    def limit_hit(self, limit: str) -> None:
        pass

    def closed_for_cause(self, cause: str) -> None:
        pass

    def connections(self, open_connections: int) -> None:
        pass


class CauseLog:
    """One log line per cause per `every` seconds, with how many connections it stands for."""

    def __init__(self, logger: logging.Logger, clock: Clock, every: float = 10.0) -> None:
        self._logger, self._clock, self._every = logger, clock, every
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def closed(self, cause: str, reason: str) -> bool:
        """Counts one connection closed for `cause`; True when a line was logged."""
        now = self._clock()
        count = self._unlogged.get(cause, 0) + 1
        last = self._last.get(cause)
        if last is not None and now - last < self._every:
            self._unlogged[cause] = count
            return False
        self._last[cause], self._unlogged[cause] = now, 0
        more = f" (and {count - 1} more since the last line)" if count > 1 else ""
        self._logger.warning("decision port: connection closed for %s: %s%s", cause, reason, more)
        return True
