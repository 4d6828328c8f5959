"""1,000 requests at once for one user near the end of the balance, settled while others are still deciding:
strict mode never spends past the entitlement; default mode passes it by less than one request's estimate."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from faults import MODEL, Client, QuotagateProcess, eventually, ledger_of, quotagate_config, reconcile
from harness import Stack, make_settings

from quotagate.core.estimate import parse_body

ALLOWANCE = 1000  # the test plan's
SPENT_BEFORE = 600
GRPC_REQUESTS = 900
ENVOY_REQUESTS = 100  # through Envoy with ext_proc: settled from the upstream's usage


def _body(max_tokens: int, content: str) -> bytes:
    return json.dumps(
        {"model": MODEL, "max_tokens": max_tokens, "stream": False, "messages": [{"role": "user", "content": content}]}
    ).encode()


@pytest.mark.parametrize("mode", ["strict", "default"])
async def test_a_thousand_requests_race_for_the_last_tokens(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path, mode: str
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix, admission_mode=mode)
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        assert stack.quotagate is not None
        service = stack.quotagate.service
        # Every settlement here costs at most its estimate (max_tokens caps the completion); the largest
        # estimate is what default mode may overshoot by.
        largest = max(service.estimate(uid, parse_body(_body(40, c))) for c in ("hello", "hello there"))
        client = Client(f"127.0.0.1:{stack.grpc_port}")
        try:
            assert await client.check(uid, f"{uid}-before")
            await client.report(uid, f"{uid}-before", prompt=0, completion=SPENT_BEFORE)
            rng = random.Random(7)
            costs = {f"{uid}-{i}": rng.randint(2, 40) for i in range(GRPC_REQUESTS)}
            settled: dict[str, int] = {}

            async def over_grpc(request_id: str) -> bool:
                if not await client.check(uid, request_id):
                    return False
                await asyncio.sleep(rng.random() * 0.05)  # the completion runs while others decide
                reply = await client.report(uid, request_id, prompt=2, completion=costs[request_id] - 2)
                assert reply.charged
                settled[request_id] = reply.cost
                return True

            async def over_envoy() -> bool:
                response = await stack.chat(uid, completion_tokens=5)
                assert response.status_code in (200, 429), response.text
                return response.status_code == 200

            calls = [over_grpc(r) for r in costs] + [over_envoy() for _ in range(ENVOY_REQUESTS)]
            random.Random(3).shuffle(calls)
            admitted = await asyncio.gather(*calls)
            assert 0 < sum(admitted) < len(admitted)

            redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:

                async def all_settled() -> bool:
                    return await redis.zcard(f"{redis_prefix}res:due") == 0

                await eventually(all_settled, seconds=30, what="every admitted request settled")
            finally:
                await redis.aclose()

            ledger = await ledger_of(database_url, uid)
            spend = ledger["charged"]  # the allowance drawn plus any overdraft
            assert spend == sum(e["cost"] for e in ledger["events"].values())
            assert all(ledger["events"][r]["cost"] == c for r, c in settled.items())
            assert len(ledger["events"]) == 1 + sum(admitted)  # each admitted request charged exactly once
            if mode == "strict":
                assert spend <= ALLOWANCE
            else:
                assert spend <= ALLOWANCE + largest - 1
            assert spend > SPENT_BEFORE

            config = tmp_path / "quotagate.yaml"
            config.write_text(yaml.safe_dump(quotagate_config(redis_prefix)), encoding="utf-8")
            env = {**os.environ, "QUOTAGATE_DATABASE_URL": database_url, "QUOTAGATE_REDIS_URL": redis_url}
            code, report = await reconcile(config, env)
            assert (code, report["drift"]) == (0, [])
        finally:
            await client.close()


async def test_two_processes_race_in_strict_mode_without_overspending(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    """The same race across two quotagate processes sharing Redis and PostgreSQL: one order for all."""
    for n in range(2):
        (tmp_path / f"qg{n}").mkdir()
    processes = [
        QuotagateProcess(tmp_path / f"qg{n}", database_url, redis_url, redis_prefix, admission_mode="strict")
        for n in range(2)
    ]
    clients: list[Client] = []
    try:
        for qg in processes:
            await qg.start()
            clients.append(Client(qg.target))
        assert await clients[0].check(uid, f"{uid}-before")
        await clients[0].report(uid, f"{uid}-before", prompt=0, completion=SPENT_BEFORE)
        rng = random.Random(11)
        costs = {f"{uid}-{i}": rng.randint(2, 40) for i in range(1000)}

        async def one(n: int, request_id: str) -> bool:
            # Decided by one process, settled by the other half of the time.
            if not await clients[n % 2].check(uid, request_id):
                return False
            await asyncio.sleep(rng.random() * 0.05)
            reply = await clients[(n // 2) % 2].report(uid, request_id, prompt=2, completion=costs[request_id] - 2)
            assert reply.charged
            return True

        admitted = await asyncio.gather(*(one(n, r) for n, r in enumerate(costs)))
        assert 0 < sum(admitted) < len(admitted)
        ledger = await ledger_of(database_url, uid)
        assert len(ledger["events"]) == 1 + sum(admitted)
        assert SPENT_BEFORE < ledger["charged"] <= ALLOWANCE
        code, report = await reconcile(processes[0].config, {**os.environ, **processes[0].env})
        assert (code, report["drift"], report["reservations"]) == (0, [], 0)
    finally:
        for client in clients:
            await client.close()
        for qg in processes:
            qg.stop()
