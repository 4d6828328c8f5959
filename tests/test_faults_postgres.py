"""PostgreSQL stopped under traffic: decisions go on from Redis, settled usage waits in the outbox and reaches
the ledger exactly once when PostgreSQL is back, across a quotagate SIGKILL and restart in between."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from faults import Client, QuotagateProcess, check_request, eventually, ledger_of, reconcile
from harness import ENVOY_AUTH, Stack, make_settings

from quotagate.core.clock import SystemClock
from quotagate.metrics import Metrics
from quotagate.outbox import OutboxItem, UsageOutbox
from quotagate.procs import free_port, start_embedded_postgres, start_redis, wait_for_port
from quotagate.server import start
from quotagate.service import QuotaService
from quotagate.store.ports import NewAccount, UsageRecord
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import RedisHotState

TTL = 3  # reservation_ttl_seconds: one request is never settled and expires while PostgreSQL is down


@pytest.fixture
def own_postgres() -> Iterator[tuple[Path, list[str]]]:
    """A PostgreSQL of this test's own, which it may stop (never the shared one); yields its data dir and a
    one-element list holding its URL.

    Its data lives outside pytest's temp root: as root, PostgreSQL runs as another system user that must
    traverse the parent directories, and a pytest session starting meanwhile makes its root private again."""
    base = Path(tempfile.mkdtemp(prefix="quotagate-pg-"))
    data = base / "pg"
    uri, _ = start_embedded_postgres(data)
    try:
        yield data, [uri]
    finally:
        # Whether the test left it running or stopped: start_embedded_postgres reuses the data dir, and its
        # stop function stops that server.
        _, stop = start_embedded_postgres(data)
        stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_postgres_outage_keeps_usage_in_the_outbox_and_writes_it_exactly_once(
    own_postgres: tuple[Path, list[str]], redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    data_dir, [database_url] = own_postgres
    # Checks sent straight to quotagate, as a callback-only deployment: an expired hold is charged its estimate.
    qg = QuotagateProcess(
        tmp_path, database_url, redis_url, redis_prefix, reservation_ttl_seconds=TTL, usage_capture="callback"
    )
    await qg.start()
    client = Client(qg.target)
    try:
        assert await client.check(uid, f"{uid}-warm")
        await client.report(uid, f"{uid}-warm", prompt=5, completion=10)

        _, stop_postgres = start_embedded_postgres(data_dir)  # the same server: returns its stop function
        stop_postgres()

        # Under traffic with PostgreSQL gone: every Check is answered from Redis, every report is kept.
        requests = [f"{uid}-{i}" for i in range(20)]

        async def one(request_id: str, n: int) -> tuple[bool, int]:
            allowed = await client.check(uid, request_id)
            reply = await client.report(uid, request_id, prompt=5, completion=10 + n)
            return allowed, reply.balance.remaining

        results = await asyncio.gather(*(one(r, n) for n, r in enumerate(requests)))
        assert all(allowed for allowed, _ in results)
        repeat = await client.report(uid, requests[0], prompt=5, completion=10)
        assert not repeat.charged  # a second report of a kept request is a repeat, not a second charge
        # The usage kept counts against the balance at once: what is left went down by all of it.
        kept = sum(15 + n for n in range(20))
        last = await client.report(uid, requests[-1], prompt=1, completion=1)
        assert last.balance.remaining == 1000 - 15 - kept

        # A request never settled expires during the outage and is kept at its estimate.
        assert await client.check(uid, f"{uid}-lost")
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def lost_in_outbox() -> bool:
                return bool(await redis.hexists(f"{redis_prefix}outbox", f"{uid}-lost"))

            await eventually(lost_in_outbox, seconds=30, what="the expired reservation in the outbox")
            assert await redis.hlen(f"{redis_prefix}outbox") == 21
        finally:
            await redis.aclose()

        async def gauge_shows_the_outbox() -> bool:
            return "quotagate_usage_outbox_records 21.0" in await qg.metrics()

        await eventually(gauge_shows_the_outbox, seconds=15, what="the outbox gauge")
        assert 'quotagate_usage_reports_total{outcome="queued"} 21.0' in await qg.metrics()

        # quotagate dies with the outbox full; PostgreSQL comes back; a new quotagate drains it.
        qg.kill()
        _, stop_postgres = start_embedded_postgres(data_dir)
        await qg.start()
        await client.close()
        client = Client(qg.target)

        async def drained() -> bool:
            return len((await ledger_of(database_url, uid))["events"]) == 22

        await eventually(drained, seconds=30, what="the outbox written to the ledger")
        ledger = await ledger_of(database_url, uid)
        events = ledger["events"]
        assert {r: events[r]["cost"] for r in requests} == {r: 15 + n for n, r in enumerate(requests)}
        lost = events[f"{uid}-lost"]
        assert (lost["estimated"], lost["source"]) == (True, "expired")
        assert ledger["charged"] == 15 + kept + lost["cost"] == ledger["used"]

        env = {**os.environ, **qg.env}
        code, report = await reconcile(qg.config, env)
        assert (code, report["drift"], report["outbox"], report["reservations"]) == (0, [], 0, 0)

        async def gauge_empty() -> bool:
            return "quotagate_usage_outbox_records 0.0" in await qg.metrics()

        await eventually(gauge_empty, seconds=15, what="the outbox gauge back at 0")

        # Decisions go on against the ledger's figures.
        assert await client.check(uid, f"{uid}-after")
        reply = await client.report(uid, f"{uid}-after", prompt=0, completion=1)
        assert reply.balance.remaining == 1000 - ledger["used"] - 1
        assert "ledger unavailable; usage kept in the outbox" in qg.log()
    finally:
        await client.close()
        qg.stop()


async def test_an_outbox_record_the_ledger_already_has_is_not_charged_again(
    database_url: str, redis_url: str, redis_prefix: str, uid: str
) -> None:
    """A drainer that dies after PostgreSQL committed and before the record left Redis: the next drain finds
    the request id in the ledger, charges nothing and only then removes the record and its hold."""
    settings = make_settings(database_url, redis_url, redis_prefix)
    service_box: list[QuotaService] = []
    ledger = await PostgresLedger.connect(database_url, lambda a: service_box[0].limits_of(a))
    hot = RedisHotState.from_url(redis_url, redis_prefix)
    outbox = UsageOutbox(hot.client, redis_prefix)
    services = [QuotaService(settings, ledger, hot, SystemClock(), Metrics(), outbox) for _ in range(2)]
    service_box.append(services[0])
    try:
        await ledger.migrate()
        await ledger.sync_plans(settings.plans)
        await ledger.ensure_account(NewAccount(uid), "small")
        now = datetime.now(UTC)
        cycle = services[0].cycle(now).key
        await hot.load(await ledger.snapshot(uid, cycle, now))
        usage = UsageRecord(f"{uid}-r", uid, "demo-small", 10, 20, cost=30, occurred_at=now)
        assert await outbox.queue(OutboxItem(usage, cycle))
        assert not await outbox.queue(OutboxItem(usage, cycle))  # queued once
        view = await hot.view(uid, cycle, now.timestamp())
        assert view is not None and view.reserved == 30  # held until the ledger has it

        await ledger.record_usage(usage, cycle, now)  # the commit the dead drainer made
        # Two drainers at once (two processes): the record is written once and released once.
        written = await asyncio.gather(*(s.drain_outbox() for s in services))
        assert sorted(written) == [0, 1]
        assert await outbox.size() == 0
        view = await hot.view(uid, cycle, now.timestamp())
        assert view is not None and (view.reserved, view.allowance_used) == (0, 30)
        assert (await ledger_of(database_url, uid))["charged"] == 30
    finally:
        await hot.close()
        await ledger.close()


async def test_the_outbox_survives_a_redis_restart_with_the_append_only_file(
    own_postgres: tuple[Path, list[str]], redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    """PostgreSQL away and then Redis restarted too: with the append-only file (as production runs Redis), the
    usage kept in the outbox is still there and reaches the ledger once."""
    data_dir, [database_url] = own_postgres
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(tmp_path / "redis", port, append_only=True)
    await wait_for_port("127.0.0.1", port, process=redis_proc)
    qg = QuotagateProcess(tmp_path, database_url, redis_url, redis_prefix)
    client: Client | None = None
    try:
        await qg.start()
        client = Client(qg.target)
        assert await client.check(uid, f"{uid}-warm")
        await client.report(uid, f"{uid}-warm", prompt=5, completion=10)
        _, stop_postgres = start_embedded_postgres(data_dir)
        stop_postgres()
        requests = [f"{uid}-{i}" for i in range(5)]
        for n, request_id in enumerate(requests):
            assert await client.check(uid, request_id)
            await client.report(uid, request_id, prompt=5, completion=n + 1)

        redis_proc.kill()
        redis_proc = start_redis(tmp_path / "redis", port, append_only=True)
        await wait_for_port("127.0.0.1", port, process=redis_proc)
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert set(await redis.hkeys(f"{redis_prefix}outbox")) == set(requests)
        finally:
            await redis.aclose()

        start_embedded_postgres(data_dir)

        async def drained() -> bool:
            return len((await ledger_of(database_url, uid))["events"]) == 6

        await eventually(drained, seconds=30, what="the outbox written to the ledger")
        ledger = await ledger_of(database_url, uid)
        assert {r: ledger["events"][r]["cost"] for r in requests} == {r: 6 + n for n, r in enumerate(requests)}
        assert ledger["charged"] == 15 + sum(6 + n for n in range(5)) == ledger["used"]
        code, report = await reconcile(qg.config, {**os.environ, **qg.env})
        assert (code, report["drift"], report["outbox"]) == (0, [], 0)
    finally:
        if client is not None:
            await client.close()
        qg.stop()
        redis_proc.stop()


async def test_usage_read_by_ext_proc_waits_in_the_outbox_while_postgres_is_down(
    own_postgres: tuple[Path, list[str]], redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    """Through Envoy: with PostgreSQL stopped, requests are still decided and the usage ext_proc reads from the
    answers (JSON and SSE) is kept, then charged from those answers, not estimated, when PostgreSQL returns."""
    data_dir, [database_url] = own_postgres
    settings = make_settings(database_url, redis_url, redis_prefix)
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        assert stack.quotagate is not None
        warm = await stack.chat(uid, completion_tokens=3)
        assert warm.status_code == 200

        async def warm_settled() -> bool:  # it lands just after the answer: not in the outbox below
            return len((await ledger_of(database_url, uid))["events"]) == 1

        await eventually(warm_settled, seconds=10, what="the first request's settlement")
        _, stop_postgres = start_embedded_postgres(data_dir)
        stop_postgres()
        responses = [await stack.chat(uid, completion_tokens=5 + n, stream=n % 2 == 1) for n in range(6)]
        assert [r.status_code for r in responses] == [200] * 6
        ids = [r.headers["x-request-id"] for r in responses]
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def all_kept() -> bool:
                return set(await redis.hkeys(f"{redis_prefix}outbox")) == set(ids)

            await eventually(all_kept, seconds=15, what="the ext_proc settlements in the outbox")
        finally:
            await redis.aclose()

        start_embedded_postgres(data_dir)
        await stack.quotagate.service.drain_outbox()  # the sweeper would, within 5 s

        async def drained() -> bool:
            return len((await ledger_of(database_url, uid))["events"]) == 7

        await eventually(drained, seconds=15, what="the outbox written to the ledger")
        events = (await ledger_of(database_url, uid))["events"]
        prompt = 3  # the demo upstream counts "hello there" as 3 prompt tokens
        assert {i: (events[i]["cost"], events[i]["estimated"], events[i]["source"]) for i in ids} == {
            i: (prompt + 5 + n, False, "ext_proc") for n, i in enumerate(ids)
        }


async def test_usage_for_a_balance_not_in_redis_is_held_until_the_ledger_has_it(
    own_postgres: tuple[Path, list[str]],
    redis_url: str,
    redis_prefix: str,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report without a reservation (the LiteLLM callback, say) for an account whose balance is not in Redis,
    while PostgreSQL is down: the usage is kept and its hold waits in Redis, so when the balance is loaded again
    the next decision already counts it, before the outbox is drained."""
    data_dir, [database_url] = own_postgres
    monkeypatch.setattr("quotagate.server.SWEEP_INTERVAL_SECONDS", 3600.0)  # this test drains by itself
    settings = make_settings(database_url, redis_url, redis_prefix)
    running = await start(settings)
    client = Client(f"127.0.0.1:{running.grpc_port}")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.check(uid, f"{uid}-0")
        await client.report(uid, f"{uid}-0", prompt=0, completion=100)
        cycle = running.service.cycle(running.service.clock.now()).key
        balance_key = f"{redis_prefix}bal:{uid}:{cycle}"
        await redis.delete(balance_key)  # evicted, or never loaded in this Redis

        _, stop_postgres = start_embedded_postgres(data_dir)
        stop_postgres()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.report(uid, f"{uid}-1", prompt=10, completion=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "usage kept in the outbox" in str(failed.value.details())
        assert await redis.hgetall(balance_key) == {"reserved": "30", "pending": "30"}
        assert await redis.pttl(balance_key) > 0

        start_embedded_postgres(data_dir)
        # The balance is loaded from the ledger (which does not have the usage yet) and keeps the hold.
        reply = await client.authz.Check(check_request(uid, f"{uid}-2"), timeout=10, metadata=ENVOY_AUTH)
        headers = {h.header.key: h.header.value for h in reply.ok_response.response_headers_to_add}
        estimate = int(await redis.hget(f"{redis_prefix}res:{uid}-2", "estimate") or 0)
        assert int(headers["x-quota-remaining"]) == 1000 - 100 - 30  # as the decision saw it: the hold counted
        loaded = await redis.hgetall(balance_key)
        assert (int(loaded["used"]), int(loaded["pending"]), estimate > 0) == (100, 30, True)

        await running.service.drain_outbox()
        view = await redis.hgetall(balance_key)
        assert (int(view["used"]), int(view["reserved"]), int(view["pending"])) == (130, estimate, 0)
        assert (await ledger_of(database_url, uid))["charged"] == 130
    finally:
        await redis.aclose()
        await client.close()
        await running.stop()
