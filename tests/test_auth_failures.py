"""The failed-admin-login limiter (quotagate.core.auth_failures) on a fake clock: budget, block, window, memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotagate.config import ConfigError, FailedAuthLimit, load_settings, parse_settings
from quotagate.core.auth_failures import FailedAuthLimiter, peer_key

CONFIGS = Path(__file__).parent / "configs"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_is_refused_after_its_budget_until_one_window_has_passed() -> None:
    clock = FakeClock()
    limiter = FailedAuthLimiter(3, 60.0, clock)
    assert [limiter.failed("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert limiter.retry_after("10.0.0.1") == 0.0  # within budget: may still try
    assert limiter.failed("10.0.0.1") == 60.0  # the third failure spends the budget
    clock.now += 59.5
    assert limiter.retry_after("10.0.0.1") == pytest.approx(0.5)
    assert limiter.failed("10.0.0.1") == pytest.approx(0.5)  # refused tries do not lengthen the block
    assert limiter.retry_after("10.0.0.2") == 0.0  # other peers are not affected
    clock.now += 0.5
    assert limiter.retry_after("10.0.0.1") == 0.0
    assert len(limiter) == 0  # the expired entry is gone
    assert [limiter.failed("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 60.0]  # a fresh budget


def test_failures_from_an_earlier_window_are_forgotten() -> None:
    clock = FakeClock()
    limiter = FailedAuthLimiter(3, 60.0, clock)
    limiter.failed("p")
    limiter.failed("p")
    clock.now += 60.0
    assert limiter.failed("p") == 0.0  # the window restarted: this is failure one of three
    assert limiter.failed("p") == 0.0
    assert limiter.failed("p") == 60.0


def test_a_clock_set_back_never_blocks_for_more_than_a_window() -> None:
    clock = FakeClock()
    limiter = FailedAuthLimiter(1, 60.0, clock)
    assert limiter.failed("p") == 60.0
    clock.now -= 3600.0
    assert limiter.retry_after("p") == 60.0


def test_memory_is_bounded_and_the_least_recently_failed_peer_goes_first() -> None:
    clock = FakeClock()
    limiter = FailedAuthLimiter(2, 60.0, clock, max_peers=3)
    for peer in ("a", "b", "c"):
        limiter.failed(peer)
    limiter.failed("a")  # a is blocked, and now the most recently failed
    limiter.failed("d")  # evicts b, the least recently failed
    assert len(limiter) == 3
    assert limiter.retry_after("a") == 60.0
    for peer in (f"x{i}" for i in range(1000)):
        limiter.failed(peer)
    assert len(limiter) == 3


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:10.1.2.3:50000", "10.1.2.3"),
        ("ipv4:10.1.2.3:50001", "10.1.2.3"),  # another source port: the same peer
        ("ipv6:[::1]:50000", "::/64"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::/64"),  # percent-encoded brackets
        ("ipv6:[2001:db8::ffff:1]:1", "2001:db8::/64"),  # the same /64: the same peer
        ("ipv6:[::ffff:10.1.2.3]:9", "10.1.2.3"),  # IPv4-mapped
        ("ipv6:[fe80::1%eth0]:9", "fe80::/64"),
        ("unix:/run/quotagate.sock", "unix"),
        ("", "unknown"),
    ],
)
def test_peer_keys_drop_the_port(peer: str, key: str) -> None:
    assert peer_key(peer) == key


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        FailedAuthLimiter(0, 60.0, FakeClock())
    with pytest.raises(ValueError):
        FailedAuthLimiter(3, 0.0, FakeClock())


# -- the setting: admin.failed_auth --------------------------------------------------------------------------


def test_the_setting_has_defaults_and_reads_both_keys() -> None:
    assert parse_settings({}, "<test>", {}).admin_failed_auth == FailedAuthLimit(10, 60.0)
    given = parse_settings({"admin": {"failed_auth": {"max_failures": 3, "window_seconds": 1}}}, "<test>", {})
    assert given.admin_failed_auth == FailedAuthLimit(3, 1.0)
    assert given.admin.listen == ""  # the rest of the admin section is read as before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("admin_failed_auth_zero", "admin.failed_auth.max_failures: must be at least 1"),
        ("admin_failed_auth_bad_window", "admin.failed_auth.window_seconds: must be positive"),
        ("admin_failed_auth_unknown_key", "admin.failed_auth.lockout_seconds: unknown key"),
    ],
)
def test_bad_settings_name_the_file_and_the_key(name: str, message: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: {message}"
