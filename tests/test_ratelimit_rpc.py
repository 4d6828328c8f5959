"""envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit on a real quotagate (real PostgreSQL and Redis),
called over a real gRPC channel as Envoy's rate-limit filter calls it.

The server's clock is a FixedClock, so windows only roll when a test moves it; the settings' timezone is
America/Sao_Paulo (harness.make_settings), which is where calendar months start.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from harness import ENVOY_AUTH, make_settings
from prometheus_client.parser import text_string_to_metric_families

from quotagate.core.clock import FixedClock
from quotagate.server import Running, start

Response = rls_pb2.RateLimitResponse
RateLimit = Response.RateLimit
OK = Response.OK
OVER = Response.OVER_LIMIT
MAX_UINT32 = 4_294_967_295
# The first second of a minute, 26 minutes before the hour: no window rolls unless a test moves the clock.
T0 = datetime(2026, 3, 10, 12, 34, 0, tzinfo=UTC)

LIMITS: dict[str, Any] = {
    "domain": "rpc",
    "descriptors": [
        {"key": "user", "rate_limit": {"name": "per_user", "unit": "minute", "requests_per_unit": 5}},
        {"key": "hourly", "rate_limit": {"unit": "hour", "requests_per_unit": 2}},
        {"key": "monthly", "rate_limit": {"unit": "month", "requests_per_unit": 3}},
        {"key": "tokens", "rate_limit": {"unit": "minute", "requests_per_unit": 1000, "counts": "tokens"}},
        {"key": "internal", "rate_limit": {"unlimited": True}},
        {"key": "blocked", "rate_limit": {"unit": "second", "requests_per_unit": 0}},
    ],
}


@dataclass
class Rls:
    running: Running
    clock: FixedClock
    stub: rls_pb2_grpc.RateLimitServiceStub

    async def call(
        self, *descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "rpc", hits_addend: int = 0
    ) -> rls_pb2.RateLimitResponse:
        request = rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors), hits_addend=hits_addend)
        response: rls_pb2.RateLimitResponse = await self.stub.ShouldRateLimit(request, timeout=5, metadata=ENVOY_AUTH)
        assert len(response.statuses) == len(descriptors)
        return response

    async def metrics(self) -> dict[tuple[str, str], float]:
        """(sample name, key label) -> value of the quotagate_ratelimit_* counters on /metrics."""
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{self.running.http_port}/metrics", timeout=5)
        assert reply.status_code == 200
        samples: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                if sample.name.startswith("quotagate_ratelimit_") and sample.name.endswith("_total"):
                    samples[(sample.name, sample.labels.get("key", ""))] = sample.value
        return samples


def desc(*pairs: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in pairs]
    )
    if hits is not None:
        descriptor.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return descriptor


def error_of(response: rls_pb2.RateLimitResponse) -> dict[str, Any]:
    body = json.loads(response.raw_body)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    message = error["message"]
    assert isinstance(message, str) and message and "\n" not in message and len(message) <= 240
    return error


def headers_of(response: rls_pb2.RateLimitResponse) -> dict[str, str]:
    pairs = [(h.key.lower(), h.value) for h in response.response_headers_to_add]
    headers = dict(pairs)
    assert len(headers) == len(pairs)  # no header twice
    return headers


@pytest.fixture
async def rls(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Rls]:
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(LIMITS), encoding="utf-8")
    clock = FixedClock(T0)
    settings = make_settings(database_url, redis_url, redis_prefix, rate_limits=str(path))
    running = await start(settings, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            yield Rls(running, clock, rls_pb2_grpc.RateLimitServiceStub(channel))
    finally:
        await running.stop()


async def test_ok_statuses_carry_the_limit_and_count_down(rls: Rls) -> None:
    remaining = []
    for _ in range(5):
        response = await rls.call(desc(("user", "alice")))
        assert response.overall_code == OK
        (status,) = response.statuses
        assert status.code == OK
        assert status.HasField("current_limit")
        assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (5, RateLimit.MINUTE)
        assert status.current_limit.name == "per_user"
        assert status.duration_until_reset.seconds == 60
        assert response.raw_body == b"" and len(response.response_headers_to_add) == 0
        remaining.append(status.limit_remaining)
    assert remaining == [4, 3, 2, 1, 0]
    other = await rls.call(desc(("user", "bob")))  # a value of its own, a counter of its own
    assert other.statuses[0].limit_remaining == 4
    hourly = (await rls.call(desc(("hourly", "alice")))).statuses[0]
    assert (hourly.current_limit.unit, hourly.limit_remaining) == (RateLimit.HOUR, 1)
    assert hourly.duration_until_reset.seconds == 26 * 60


async def test_hits_addend_of_the_request_and_of_a_descriptor(rls: Rls) -> None:
    counted = await rls.call(desc(("user", "carol")), hits_addend=3)
    assert (counted.overall_code, counted.statuses[0].limit_remaining) == (OK, 2)
    # The descriptor's own hits_addend wins over the request's.
    own = await rls.call(desc(("user", "carol"), hits=1), hits_addend=3)
    assert (own.overall_code, own.statuses[0].limit_remaining) == (OK, 1)
    # hits_addend 0 on the descriptor checks without counting.
    for _ in range(3):
        peek = await rls.call(desc(("user", "carol"), hits=0), hits_addend=3)
        assert (peek.overall_code, peek.statuses[0].limit_remaining) == (OK, 1)
    # The request's hits_addend unset (0) counts one.
    last = await rls.call(desc(("user", "carol")))
    assert (last.overall_code, last.statuses[0].limit_remaining) == (OK, 0)
    over = await rls.call(desc(("user", "carol")))
    assert over.overall_code == OVER
    # Descriptors in one request count their own hits.
    both = await rls.call(desc(("user", "dave"), hits=2), desc(("user", "erin")), hits_addend=4)
    assert [s.limit_remaining for s in both.statuses] == [3, 1]


async def test_over_limit_answers_with_an_openai_style_body_and_headers(rls: Rls) -> None:
    rls.clock.advance(15)  # 45 s to the next minute
    await rls.call(desc(("user", "frank")), hits_addend=5)
    response = await rls.call(desc(("user", "frank")))
    assert response.overall_code == OVER
    (status,) = response.statuses
    assert status.code == OVER
    assert status.limit_remaining == 0
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (5, RateLimit.MINUTE)
    assert status.duration_until_reset.seconds == 45
    error = error_of(response)
    assert "45" in error["message"]
    assert headers_of(response) == {"content-type": "application/json", "retry-after": "45"}
    # The next minute starts from zero.
    rls.clock.advance(45)
    again = await rls.call(desc(("user", "frank")))
    assert (again.overall_code, again.statuses[0].limit_remaining) == (OK, 4)
    assert again.raw_body == b""


async def test_a_token_limit_says_tokens(rls: Rls) -> None:
    ok = await rls.call(desc(("tokens", "grace")), hits_addend=999)
    assert (ok.overall_code, ok.statuses[0].limit_remaining) == (OK, 1)
    over = await rls.call(desc(("tokens", "grace")), hits_addend=2)
    assert over.overall_code == OVER
    assert "token" in error_of(over)["message"].lower()
    assert headers_of(over)["retry-after"] == "60"


async def test_unknown_domain_and_unlimited_are_ok_without_a_limit(rls: Rls) -> None:
    unknown = await rls.call(desc(("user", "alice")), desc(("internal", "x")), domain="no-such-domain")
    assert unknown.overall_code == OK
    for status in unknown.statuses:
        assert status.code == OK and not status.HasField("current_limit")
        assert status.duration_until_reset.seconds == 0
    for _ in range(3):
        unlimited = await rls.call(desc(("internal", "batch")), hits_addend=1_000_000)
        assert unlimited.overall_code == OK
        (status,) = unlimited.statuses
        assert status.code == OK and not status.HasField("current_limit")
        assert status.limit_remaining == MAX_UINT32


async def test_every_descriptor_gets_a_status_in_order(rls: Rls) -> None:
    response = await rls.call(
        desc(("user", "heidi")),
        desc(("nothing", "configured")),
        desc(("internal", "x")),
        desc(("hourly", "heidi")),
        desc(("blocked", "x")),
    )
    assert response.overall_code == OVER  # the blocked one
    user, nothing, internal, hourly, blocked = response.statuses
    assert [s.code for s in response.statuses] == [OK, OK, OK, OK, OVER]
    assert (user.current_limit.unit, user.limit_remaining) == (RateLimit.MINUTE, 4)
    assert not nothing.HasField("current_limit")
    assert (internal.HasField("current_limit"), internal.limit_remaining) == (False, MAX_UINT32)
    assert (hourly.current_limit.unit, hourly.limit_remaining) == (RateLimit.HOUR, 1)
    assert (blocked.current_limit.unit, blocked.current_limit.requests_per_unit) == (RateLimit.SECOND, 0)
    assert blocked.duration_until_reset.seconds == 1
    assert headers_of(response)["retry-after"] == "1"
    error_of(response)


async def test_a_month_resets_at_the_next_month_in_the_configured_timezone(rls: Rls) -> None:
    # 01:00 UTC on April 1st is still 22:00 on March 31st in São Paulo (UTC-3): the month ends at 03:00 UTC.
    rls.clock.set(datetime(2026, 4, 1, 1, 0, 0, tzinfo=UTC))
    statuses = [(await rls.call(desc(("monthly", "ivan")))).statuses[0] for _ in range(3)]
    assert [s.limit_remaining for s in statuses] == [2, 1, 0]
    assert all(s.current_limit.unit == RateLimit.MONTH and s.current_limit.requests_per_unit == 3 for s in statuses)
    assert all(s.duration_until_reset.seconds == 2 * 3600 for s in statuses)
    over = await rls.call(desc(("monthly", "ivan")))
    assert over.overall_code == OVER
    assert over.statuses[0].duration_until_reset.seconds == 7200
    assert headers_of(over)["retry-after"] == "7200"
    # At local midnight the new month starts; it lasts all of April (30 days).
    rls.clock.set(datetime(2026, 4, 1, 3, 0, 0, tzinfo=UTC))
    april = (await rls.call(desc(("monthly", "ivan")))).statuses[0]
    assert (april.code, april.limit_remaining) == (OK, 2)
    assert april.duration_until_reset.seconds == 30 * 86400


async def test_invalid_requests_are_invalid_argument(rls: Rls) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rls.call(desc(("user", "alice")), domain="")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rls.stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="rpc"), timeout=5, metadata=ENVOY_AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "descriptor" in (info.value.details() or "")
    # The server still answers afterwards.
    assert (await rls.call(desc(("user", "judy")))).overall_code == OK


async def test_metrics_count_hits_over_near_and_within_per_limit(rls: Rls) -> None:
    for _ in range(6):  # 5 a minute: within 1-5 (the 5th past 80%), then over
        await rls.call(desc(("user", "mallory")))
    for _ in range(2):
        await rls.call(desc(("hourly", "mallory")))
    await rls.call(desc(("nothing", "configured")))
    metrics = await rls.metrics()
    assert metrics[("quotagate_ratelimit_hits_total", "rpc.user")] == 6
    assert metrics[("quotagate_ratelimit_within_limit_total", "rpc.user")] == 5
    assert metrics[("quotagate_ratelimit_near_limit_total", "rpc.user")] == 1
    assert metrics[("quotagate_ratelimit_over_limit_total", "rpc.user")] == 1
    assert metrics[("quotagate_ratelimit_hits_total", "rpc.hourly")] == 2
    assert metrics[("quotagate_ratelimit_within_limit_total", "rpc.hourly")] == 2
    assert metrics[("quotagate_ratelimit_near_limit_total", "rpc.hourly")] == 1  # 2 of 2 is past 80%
    assert metrics.get(("quotagate_ratelimit_over_limit_total", "rpc.hourly"), 0) == 0
    assert not any("nothing" in key for _, key in metrics)


async def _redis_clients(client: aioredis.Redis) -> dict[int, str]:
    """Every connection to Redis: its id and the last command it sent."""
    return {int(entry["id"]): str(entry["cmd"]) for entry in await client.client_list()}


async def test_stop_closes_the_redis_connection_of_the_rate_limiter(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # Running.stop() is "down again in order": nothing quotagate opened may stay connected to Redis afterwards.
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(LIMITS), encoding="utf-8")
    observer = aioredis.Redis.from_url(redis_url)
    try:
        before = await _redis_clients(observer)
        settings = make_settings(database_url, redis_url, redis_prefix, rate_limits=str(path))
        running = await start(settings, clock=FixedClock(T0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                request = rls_pb2.RateLimitRequest(domain="rpc", descriptors=[desc(("user", "oscar"))])
                response = await stub.ShouldRateLimit(request, timeout=5, metadata=ENVOY_AUTH)
                assert response.statuses[0].limit_remaining == 4  # counted in Redis
        finally:
            await running.stop()
        after = await _redis_clients(observer)
        left_open = {cid: cmd for cid, cmd in after.items() if cid not in before}
    finally:
        await observer.aclose()
    # The rate limiter's connection (its last command was the counting script's EVALSHA) must be closed too.
    assert left_open == {}, f"connections of the stopped quotagate still open (id: last command): {left_open}"


async def test_a_limit_above_32_bits_is_reported_capped_not_as_an_error(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    limits = tmp_path / "big.yaml"
    limits.write_text(
        "domain: big\ndescriptors:\n  - key: user\n"
        "    rate_limit: {unit: month, requests_per_unit: 10000000000, counts: tokens}\n"
    )
    running = await start(make_settings(database_url, redis_url, redis_prefix, rate_limits=str(limits)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(domain="big", hits_addend=5000)
            request.descriptors.add().entries.add(key="user", value="u1")
            reply = await stub.ShouldRateLimit(request, metadata=ENVOY_AUTH)
        assert reply.overall_code == rls_pb2.RateLimitResponse.OK
        assert reply.statuses[0].current_limit.requests_per_unit == 2**32 - 1
        assert reply.statuses[0].limit_remaining == 2**32 - 1
    finally:
        await running.stop()
