"""Concurrency and settlement through the real parts: exact admission, idempotent reports, nothing lost."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from harness import ADMIN_TOKEN, USAGE_AUTH, Stack, make_settings

from quotagate.core.clock import FixedClock
from quotagate.v1 import admin_pb2, usage_pb2

# "hello there" (11 characters) -> ceil(11 / 4 * 1.2) = 4 prompt tokens, plus max_tokens 40: 44 per request.
ESTIMATE = 44


def tiny_plan(allowance: int) -> list[dict[str, object]]:
    return [{"id": f"tiny-{allowance}", "monthly_allowance": allowance}]


async def _burst(stack: Stack, user: str, count: int) -> list[int]:
    responses = await asyncio.gather(*(stack.chat(user) for _ in range(count)))
    return [r.status_code for r in responses]


async def test_200_concurrent_checks_strict_admit_exactly_ten(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(
        database_url, redis_url, redis_prefix, admission_mode="strict", plans=tiny_plan(10 * ESTIMATE)
    )
    async with Stack(settings, tmp_path) as stack:
        codes = await _burst(stack, uid, 200)
        assert codes.count(200) == 10
        assert codes.count(429) == 190
        account = await stack.account(uid)
        assert account.balance.reserved == 10 * ESTIMATE
        assert account.balance.remaining == 0


async def test_default_mode_overspend_is_bounded_by_one_estimate(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    allowance = 10 * ESTIMATE + 6  # anything left admits one more request in default mode
    settings = make_settings(database_url, redis_url, redis_prefix, plans=tiny_plan(allowance))
    async with Stack(settings, tmp_path) as stack:
        codes = await _burst(stack, uid, 200)
        admitted = codes.count(200)
        assert admitted == math.ceil(allowance / ESTIMATE) == 11
        assert admitted * ESTIMATE - allowance < ESTIMATE


async def test_same_report_five_times_concurrently_charges_once(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        response = await stack.chat(uid)
        request_id = response.headers["x-request-id"]
        replies = await asyncio.gather(*(stack.report(uid, request_id, 100, 23) for _ in range(5)))
        assert sorted(r.charged for r in replies) == [False, False, False, False, True]
        assert {r.cost for r in replies} == {123}
        account = await stack.account(uid)
        assert account.balance.allowance_used == 123
        assert account.balance.reserved == 0
        events = await stack.quotagate.service.ledger.usage_events(uid)  # type: ignore[union-attr]
        assert [e["request_id"] for e in events] == [request_id]


async def test_restart_and_flushed_redis_lose_no_settled_usage(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        first = await stack.chat(uid)
        await stack.report(uid, first.headers["x-request-id"], 990)
        await stack.stop_quotagate()
        # Everything Redis knew is gone: the ledger must be the one that answers.
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
        assert keys, "the hot state should have existed before the flush"
        await client.delete(*keys)
        await client.aclose()
        await stack.start_quotagate()
        after = await stack.chat(uid)
        assert after.status_code == 200
        assert after.headers["x-quota-remaining"] == "10"
        assert after.headers["x-quota-state"] == "critical"
        await stack.report(uid, after.headers["x-request-id"], 10)
        blocked = await stack.chat(uid)
        assert blocked.status_code == 429
        account = await stack.account(uid)
        assert account.balance.allowance_used == 1000


async def test_unsettled_reservation_expires_and_is_charged_its_estimate(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    clock = FixedClock(datetime.now(UTC))
    # Usage reported by a callback only (no ext_proc): quotagate cannot tell whether the request reached the
    # upstream, so an unsettled hold is charged (test_redteam_meter shows the ext_proc deployment's release).
    settings = make_settings(
        database_url, redis_url, redis_prefix, reservation_ttl_seconds=60, usage_capture="callback"
    )
    async with Stack(settings, tmp_path, clock=clock) as stack:
        response = await stack.chat(uid)
        request_id = response.headers["x-request-id"]
        service = stack.quotagate.service  # type: ignore[union-attr]
        assert await service.expire_due() == 0  # not due yet
        clock.advance(61)
        assert await service.expire_due() == 1
        account = await stack.account(uid)
        assert account.balance.allowance_used == ESTIMATE
        assert account.balance.reserved == 0
        [event] = await service.ledger.usage_events(uid)
        assert (event["request_id"], event["estimated"], event["source"], event["cost"]) == (
            request_id,
            True,
            "expired",
            ESTIMATE,
        )
        late = await stack.report(uid, request_id, 5)  # the real report came too late: no second charge
        assert not late.charged
        assert (await stack.account(uid)).balance.allowance_used == ESTIMATE


async def test_report_for_unknown_request_charges_the_named_user(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        reply = await stack.report(uid, "never-checked-request", 40, 2)
        assert reply.charged and reply.cost == 42
        account = await stack.account(uid)
        assert account.plan == "small"
        assert account.balance.allowance_used == 42


@pytest.mark.parametrize(
    ("report", "needle"),
    [
        (usage_pb2.ReportUsageRequest(request_id="r1", user_id="u", prompt_tokens=-1), "prompt_tokens"),
        (usage_pb2.ReportUsageRequest(request_id="r2", user_id="u", completion_tokens=-9), "completion_tokens"),
        (usage_pb2.ReportUsageRequest(user_id="u", prompt_tokens=3), "request_id"),
        (usage_pb2.ReportUsageRequest(request_id="r3", prompt_tokens=3), "user_id"),
        (usage_pb2.ReportUsageRequest(request_id="r4", user_id="u", prompt_tokens=10**12), "prompt_tokens"),
    ],
    ids=["negative prompt", "negative completion", "no request id", "no user", "absurd count"],
)
async def test_bad_reports_get_invalid_argument_and_charge_nothing(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    report: usage_pb2.ReportUsageRequest,
    needle: str,
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.usage.ReportUsage(report, metadata=USAGE_AUTH)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (caught.value.details() or "")
        events = await stack.quotagate.service.ledger.usage_events("u")  # type: ignore[union-attr]
        assert events == []


async def test_failed_upstream_call_releases_and_charges_nothing(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        response = await stack.chat(uid)
        assert (await stack.account(uid)).balance.reserved == ESTIMATE
        reply = await stack.usage.ReportUsage(
            usage_pb2.ReportUsageRequest(
                request_id=response.headers["x-request-id"], user_id=uid, status=usage_pb2.ReportUsageRequest.FAILED
            ),
            metadata=USAGE_AUTH,
        )
        assert not reply.charged and reply.cost == 0
        balance = (await stack.account(uid)).balance
        assert (balance.reserved, balance.allowance_used) == (0, 0)


async def test_admin_calls_need_the_admin_token(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        await stack.chat(uid)
        request = admin_pb2.GrantCreditsRequest(user_id=uid, amount=10, reason="Asked by e-mail.")
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", f"Basic {ADMIN_TOKEN}")]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.admin.GrantCredits(request, metadata=metadata)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stack.admin.GetAccount(
                admin_pb2.GetAccountRequest(user_id="nobody-" + uid),
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as no_reason:
            await stack.admin.GrantCredits(
                admin_pb2.GrantCreditsRequest(user_id=uid, amount=10),
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            )
        assert no_reason.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (await stack.account(uid)).balance.credits == 0
        audit = await stack.quotagate.service.ledger.audit_entries(uid)  # type: ignore[union-attr]
        assert [a["action"] for a in audit] == ["account.create"]
