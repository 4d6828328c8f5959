"""quotagate killed with SIGKILL while streams pass through Envoy: after a restart the reservations of the
streams it never saw end expire and are charged at their estimate (recorded as estimated), and the requests
whose usage did arrive are not charged again."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml
from faults import Client, QuotagateProcess, eventually, ledger_of, quotagate_config, reconcile, start_envoy_in_front
from harness import CLIENT_KEY, make_settings

from quotagate.core.clock import FixedClock
from quotagate.demo_upstream import start_demo_upstream
from quotagate.procs import wait_envoy_ready
from quotagate.server import start
from quotagate.store.ports import UsageRecord

TTL = 3  # reservation_ttl_seconds


def _chat(stream: bool, delay_ms: int = 0) -> tuple[dict[str, str], dict[str, object]]:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
    if delay_ms:
        headers["x-demo-chunk-delay-ms"] = str(delay_ms)
    body = {
        "model": "demo-small",
        "max_tokens": 20,
        "stream": stream,
        "messages": [{"role": "user", "content": "tell me a long story"}],
    }
    return headers, body


async def test_sigkill_during_streams_charges_estimates_once_after_restart(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    # Checks sent straight to quotagate, as a callback-only deployment: an expired hold is charged its estimate.
    qg = QuotagateProcess(
        tmp_path, database_url, redis_url, redis_prefix, reservation_ttl_seconds=TTL, usage_capture="callback"
    )
    await qg.start()
    upstream, upstream_port = await start_demo_upstream()
    envoy, envoy_port, admin_port = start_envoy_in_front(qg, upstream_port, tmp_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy_port}", timeout=30)
    streams: list[asyncio.Task[None]] = []
    try:
        await wait_envoy_ready(admin_port, process=envoy)
        headers = {"x-user-id": uid}

        # Requests that finish before the kill: their usage is settled from the answers.
        for stream in (False, True, True):
            h, body = _chat(stream)
            response = await http.post("/v1/chat/completions", json=body, headers={**h, **headers})
            assert response.status_code == 200, response.text

        async def no_reservations_left() -> bool:
            return await redis.zcard(f"{redis_prefix}res:due") == 0

        await eventually(no_reservations_left, what="the finished requests settled")
        finished = set((await ledger_of(database_url, uid))["events"])
        assert len(finished) == 3

        # Streams in flight (one word every 300 ms) when quotagate dies.
        started = asyncio.Event()
        opened = 0

        async def slow_stream() -> None:
            nonlocal opened
            h, body = _chat(True, delay_ms=300)
            with contextlib.suppress(httpx.HTTPError):
                async with http.stream("POST", "/v1/chat/completions", json=body, headers={**h, **headers}) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        opened += 1
                        if opened >= 4:
                            started.set()

        streams = [asyncio.create_task(slow_stream()) for _ in range(4)]

        async def four_in_flight() -> bool:
            return await redis.zcard(f"{redis_prefix}res:due") == 4 and started.is_set()

        await eventually(four_in_flight, what="four streams in flight")
        in_flight = {}
        for request_id in await redis.zrange(f"{redis_prefix}res:due", 0, -1):
            in_flight[request_id] = int(await redis.hget(f"{redis_prefix}res:{request_id}", "estimate") or 0)
        assert all(in_flight.values()) and not finished & set(in_flight)

        qg.kill()
        await asyncio.gather(*streams)  # Envoy lets them finish without ext_proc (its failure mode allows)
        await qg.start()

        async def all_charged() -> bool:
            return len((await ledger_of(database_url, uid))["events"]) == 7

        await eventually(all_charged, seconds=40, what="the reservations of the cut streams charged")
        ledger = await ledger_of(database_url, uid)
        events = ledger["events"]
        for request_id, estimate in in_flight.items():
            event = events[request_id]
            assert (event["cost"], event["estimated"], event["source"]) == (estimate, True, "expired")
        for request_id in finished:
            assert (events[request_id]["estimated"], events[request_id]["source"]) == (False, "ext_proc")
        # Each request charged once: the ledger's draws add up to the events' costs.
        assert ledger["charged"] == sum(e["cost"] for e in events.values()) == ledger["used"]
        assert "reservation expired unsettled; charged its estimate" in qg.log()

        code, report = await reconcile(qg.config, {**os.environ, **qg.env})
        assert (code, report["drift"], report["reservations"]) == (0, [], 0)
    finally:
        for task in streams:
            task.cancel()
        await http.aclose()
        await redis.aclose()
        envoy.stop()
        await upstream.cleanup()
        qg.stop()


async def test_a_settlement_the_ledger_has_but_redis_never_heard_of_is_not_charged_again(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    """A process killed between a settlement's PostgreSQL commit and its Redis step leaves the reservation in
    Redis: when it expires, the ledger already has the request id, so nothing more is charged and the hold
    goes."""
    clock = FixedClock(datetime.now(UTC))
    settings = make_settings(database_url, redis_url, redis_prefix, reservation_ttl_seconds=60)
    running = await start(settings, clock=clock)
    client = Client(f"127.0.0.1:{running.grpc_port}")
    try:
        assert await client.check(uid, f"{uid}-1")
        service = running.service
        now = clock.now()
        usage = UsageRecord(f"{uid}-1", uid, "demo-small", 7, 10, cost=17, occurred_at=now, source="ext_proc")
        await service.ledger.record_usage(usage, service.cycle(now).key, now)  # the commit; then the kill

        clock.advance(61)
        assert await service.expire_due() == 0  # nothing charged at the estimate
        ledger = await ledger_of(database_url, uid)
        assert (ledger["charged"], ledger["events"][f"{uid}-1"]["source"]) == (17, "ext_proc")
        view = await service.hot.view(uid, service.cycle(clock.now()).key, clock.now().timestamp())
        assert view is not None and (view.allowance_used, view.reserved) == (17, 0)
        code, report = await reconcile_with(redis_prefix, database_url, redis_url, tmp_path)
        assert (code, report["drift"], report["reservations"]) == (0, [], 0)
    finally:
        await client.close()
        await running.stop()


async def reconcile_with(prefix: str, database_url: str, redis_url: str, tmp: Path) -> tuple[int, Any]:
    config = tmp / "reconcile.yaml"
    config.write_text(yaml.safe_dump(quotagate_config(prefix)), encoding="utf-8")
    env = {**os.environ, "QUOTAGATE_DATABASE_URL": database_url, "QUOTAGATE_REDIS_URL": redis_url}
    return await reconcile(config, env)
