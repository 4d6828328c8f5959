"""Failed admin logins, counted per peer: after `max_failures` wrong tokens within `window_seconds` the peer is
refused, its token not even compared, for one window. Pure (no gRPC), with an injected clock (seconds), so tests
step time exactly; the Admin adapter turns a refusal into a gRPC status."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

# Enough for every admin host there will ever be; an attacker with more addresses than this evicts the oldest
# entries first (least recently failed), and memory stays bounded either way.
DEFAULT_MAX_PEERS = 10_000


def peer_key(peer: str) -> str:
    """The key a gRPC peer string counts under: its IP without the port, so many source ports on one host are one
    peer. An IPv6 address counts by its /64, since one host is usually handed a whole /64."""
    kind, _, rest = unquote(peer).partition(":")  # "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/run/x"
    if kind not in ("ipv4", "ipv6"):
        return kind or "unknown"  # Unix sockets: every local caller is one peer
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass
class _Peer:
    window_start: float
    failures: int = 0
    blocked_until: float = 0.0


class FailedAuthLimiter:
    """Per peer: at most `max_failures` failed attempts a window, then refusals until a window has passed.

    Only failures are counted; a peer that never fails is never tracked, and a successful call does not reset the
    count (an attacker sharing a host with an admin must not earn guesses from the admin's calls).
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        clock: Callable[[], float],
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        if max_failures < 1 or window_seconds <= 0 or max_peers < 1:
            raise ValueError("max_failures, window_seconds and max_peers must be positive")
        self._max_failures = max_failures
        self._window = window_seconds
        self._clock = clock
        self._max_peers = max_peers
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._peers)

    def retry_after(self, peer: str) -> float:
        """Seconds before `peer` may try again; 0.0 when it may try now."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0.0
        now = self._clock()
        if entry.blocked_until:
            # Never longer than one window from now, even if the clock was set back.
            wait = min(entry.blocked_until - now, self._window)
            if wait > 0:
                return wait
            del self._peers[peer]  # the block is over: a fresh budget
        elif not entry.window_start <= now < entry.window_start + self._window:
            del self._peers[peer]  # the failures are from an earlier window
        return 0.0

    def failed(self, peer: str) -> float:
        """Counts one failed attempt by `peer`; returns how long it is now refused (0.0 while within budget)."""
        wait = self.retry_after(peer)  # also drops a stale entry
        if wait > 0:
            return wait  # refused attempts are not counted: a block never grows past one window
        now = self._clock()
        entry = self._peers.pop(peer, None)
        if entry is None:
            entry = _Peer(window_start=now)
            while len(self._peers) >= self._max_peers:
                self._peers.popitem(last=False)
        self._peers[peer] = entry  # now the most recently failed
        entry.failures += 1
        if entry.failures >= self._max_failures:
            entry.blocked_until = now + self._window
            return self._window
        return 0.0
