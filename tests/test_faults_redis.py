"""Redis killed and restarted under traffic: Check follows on_store_error (each such decision counted and
logged), usage is still charged to the ledger, and afterwards the hot state is rebuilt from PostgreSQL and
agrees with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from faults import Client, QuotagateProcess, check_request, eventually, ledger_of, reconcile
from google.rpc import code_pb2
from harness import ENVOY_AUTH

from quotagate.procs import free_port, start_redis, wait_for_port


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_restart_under_traffic(
    database_url: str, redis_prefix: str, uid: str, tmp_path: Path, policy: str
) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(tmp_path / "redis", port)
    await wait_for_port("127.0.0.1", port, process=redis_proc)
    # The traffic never runs out of tokens. A plan id of its own: plans are seeded once per database, so
    # redefining "small" would change it for every other test of the session.
    plans = [{"id": "faults-roomy", "monthly_allowance": 10_000_000}]
    qg = QuotagateProcess(
        tmp_path, database_url, redis_url, redis_prefix, on_store_error=policy, plans=plans, default_plan="faults-roomy"
    )
    client: Client | None = None
    try:
        await qg.start()
        client = Client(qg.target)
        outcomes: Counter[str] = Counter()
        inflight: Counter[str] = Counter()
        reported: dict[str, int] = {}
        phase = {"name": "before"}
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            assert client is not None
            n = 0
            while not stop.is_set():
                n += 1
                request_id = f"{uid}-{w}-{n}"
                label = phase["name"]  # when the call started: calls in flight at the kill count as before
                inflight[label] += 1
                try:
                    reply = await client.authz.Check(check_request(uid, request_id), timeout=10, metadata=ENVOY_AUTH)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # deny: Envoy's failure mode decides
                    outcomes[f"{label}:unavailable"] += 1
                    continue
                finally:
                    inflight[label] -= 1
                assert reply.status.code == code_pb2.OK, reply.status
                # A decision taken with the store hands ext_proc what it decided; a fail-open one has nothing to
                # hand on (both name the user to the upstream, as quotagate knows it).
                kind = "decided" if reply.dynamic_metadata.fields else "fail-open"
                assert {h.header.key: h.header.value for h in reply.ok_response.headers}["x-quota-user"] == uid
                outcomes[f"{label}:{kind}"] += 1
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await client.report(uid, request_id, prompt=2, completion=3)
                    reported[request_id] = 5
                await asyncio.sleep(0.01)

        workers = [asyncio.create_task(worker(w)) for w in range(4)]

        async def seen(key: str, at_least: int = 5) -> bool:
            for task in workers:
                if task.done():
                    task.result()  # a worker that failed fails the test with its own error
            return outcomes[key] >= at_least

        async def no_calls(label: str) -> bool:
            return inflight[label] == 0

        await eventually(lambda: seen("before:decided"), what="decisions before the fault")
        redis_proc.kill()
        phase["name"] = "outage"
        store_kind = "outage:unavailable" if policy == "deny" else "outage:fail-open"
        await eventually(lambda: seen(store_kind), what=f"{policy} decisions without Redis")
        phase["name"] = "restart"  # calls from here on may meet the new Redis
        await eventually(lambda: no_calls("outage"), what="the calls of the outage answered")
        redis_proc = start_redis(tmp_path / "redis", port)  # a new, empty Redis (no persistence)
        await wait_for_port("127.0.0.1", port, process=redis_proc)
        phase["name"] = "after"
        await eventually(lambda: seen("after:decided"), what="decisions from the rebuilt hot state")
        stop.set()
        await asyncio.gather(*workers)

        assert outcomes["outage:decided"] == 0
        # Every decision taken without the store is counted by policy and logged, one line each.
        without_store = sum(n for key, n in outcomes.items() if key.endswith((":unavailable", ":fail-open")))
        metrics = await qg.metrics()
        assert f'quotagate_store_errors_total{{policy="{policy}"}} {float(without_store)}' in metrics
        lines = [line for line in qg.log().splitlines() if f"store unavailable; on_store_error={policy}" in line]
        assert len(lines) == without_store
        assert all(f'"request_id": "{uid}-' in line for line in lines)  # each names its request

        # Usage reported during the outage was charged all the same, once per request.
        ledger = await ledger_of(database_url, uid)
        assert set(ledger["events"]) == set(reported)
        assert ledger["charged"] == ledger["used"] == sum(reported.values())

        # The rebuilt hot state equals the ledger.
        code, report = await reconcile(qg.config, {**os.environ, **qg.env})
        assert (code, report["drift"]) == (0, []), report
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            balance = await redis.hgetall(f"{redis_prefix}bal:{uid}:{report['cycle']}")
        finally:
            await redis.aclose()
        assert int(balance["used"]) == ledger["used"]
    finally:
        if client is not None:
            await client.close()
        qg.stop()
        redis_proc.stop()
