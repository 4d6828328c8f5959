"""`quotagate serve --workers N`: one port, N processes that all answer Check, a crashed worker started again,
SIGTERM drains them all; and a revoked key refused by every worker within a second."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import grpc
from google.rpc import code_pb2
from harness import ADMIN_TOKEN, CLIENT_KEY
from served import Served, check_once, check_request, kill_group, start_served

from quotagate.v1 import admin_pb2, admin_pb2_grpc
from quotagate.workers import Supervisor, restart_delay

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]


def decisions(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r"^quotagate_decisions_total\{[^}]*\} (\S+)$", metrics, re.M))


def worker_of(metrics: str) -> str:
    match = re.search(r'quotagate_worker_info\{pid="\d+",worker="(\d+)"\}', metrics)
    assert match
    return match.group(1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def all_workers(served: Served, count: int) -> dict[str, str]:
    seen = await served.workers_seen(count)
    assert len(seen) == count, f"only pids {sorted(seen)} answered /metrics"
    return seen


async def test_two_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    served = await start_served(tmp_path, database_url, redis_url, redis_prefix, "--workers", "2")
    try:
        seen = await all_workers(served, 2)
        assert {worker_of(text) for text in seen.values()} == {"0", "1"}
        supervisor_pid = served.proc.pid
        assert supervisor_pid not in {int(p) for p in seen}

        # Each Check on a connection of its own: the kernel spreads them over both workers.
        replies = await asyncio.gather(
            *(check_once(served.target, check_request(CLIENT_KEY, f"{uid}-{i % 3}")) for i in range(40))
        )
        assert all(r.status.code == code_pb2.OK for r in replies)
        after = await all_workers(served, 2)
        per_worker = {pid: decisions(text) for pid, text in after.items()}
        assert all(n > 0 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) >= 40

        # The decision port (the unary server Envoy calls) is shared the same way.
        replies = await asyncio.gather(
            *(check_once(served.decision_target, check_request(CLIENT_KEY, f"{uid}-{i % 3}")) for i in range(40))
        )
        assert all(r.status.code == code_pb2.OK for r in replies)
        later = await all_workers(served, 2)
        grown = {pid: decisions(text) - per_worker.get(pid, 0.0) for pid, text in later.items()}
        assert all(n > 0 for n in grown.values()), grown
        assert sum(grown.values()) >= 40
        after = later

        # A worker killed outright is started again on the same port, with the same index.
        victim = next(pid for pid, text in after.items() if worker_of(text) == "1")
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 30
        replaced: dict[str, str] = {}
        while time.monotonic() < deadline:
            replaced = await served.workers_seen(2, tries=20)
            if len(replaced) == 2 and victim not in replaced:
                break
            await asyncio.sleep(0.2)
        assert victim not in replaced and len(replaced) == 2, sorted(replaced)
        assert {worker_of(text) for text in replaced.values()} == {"0", "1"}
        reply = await check_once(served.target, check_request(CLIENT_KEY, uid))
        assert reply.status.code == code_pb2.OK

        workers = [int(pid) for pid in replaced]
        code = await served.terminate()
    finally:
        kill_group(served)
    out = served.text()
    assert code == 0, out[-3000:]
    assert not any(alive(pid) for pid in workers)
    assert "worker 1" in out and "starting it again" in out
    assert out.count("stopping") >= 2  # each worker drained (serve_forever logs it before stopping)


async def test_a_revoked_key_is_refused_by_every_worker_within_a_second(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    served = await start_served(tmp_path, database_url, redis_url, redis_prefix, "--workers", "2")
    try:
        await all_workers(served, 2)
        async with grpc.aio.insecure_channel(served.target) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            created = await admin.CreateClientKey(
                admin_pb2.CreateClientKeyRequest(name=f"{uid}-key", trusted=True, reason="A new front end."),
                metadata=ADMIN,
            )
        secret = created.secret
        # Known to both workers within a second too (each Check below may land on either one).
        await asyncio.sleep(1.0)
        before = await asyncio.gather(*(check_once(served.target, check_request(secret, uid)) for _ in range(20)))
        assert [r.status.code for r in before] == [code_pb2.OK] * 20

        async with grpc.aio.insecure_channel(served.target) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            await admin.RevokeClientKey(
                admin_pb2.RevokeClientKeyRequest(name=f"{uid}-key", reason="The key leaked in a ticket."),
                metadata=ADMIN,
            )
        revoked_at = time.monotonic()
        await asyncio.sleep(1.0)
        after = await asyncio.gather(*(check_once(served.target, check_request(secret, uid)) for _ in range(20)))
        elapsed = time.monotonic() - revoked_at
        assert [r.status.code for r in after] == [code_pb2.UNAUTHENTICATED] * 20
        assert all(r.denied_response.status.code == 401 for r in after)
        assert elapsed < 2.5  # the calls themselves are quick; the 1 s wait is what the test grants
        # Both workers were asked (the refusals are counted in each one's metrics).
        seen = await all_workers(served, 2)
        assert all('quotagate_decisions_total{state="unauthenticated"}' in text for text in seen.values())
        assert await served.terminate() == 0
    finally:
        kill_group(served)


def test_restart_backoff_doubles_and_is_capped() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == 30.0


async def test_supervisor_refuses_zero_workers() -> None:
    try:
        Supervisor(["true"], 0)
    except ValueError as exc:
        assert "at least 1" in str(exc)
    else:
        raise AssertionError("Supervisor accepted 0 workers")
