"""SIGTERM with a stream in flight through Envoy: health turns NOT_SERVING first, the stream's ext_proc call
runs to its end (its usage is settled from the answer, not estimated), and only then does the process exit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import httpx
from faults import QuotagateProcess, eventually, ledger_of, reconcile, start_envoy_in_front
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import CLIENT_KEY

from quotagate.demo_upstream import start_demo_upstream
from quotagate.procs import wait_envoy_ready


async def test_sigterm_turns_not_serving_lets_the_stream_finish_then_exits(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    qg = QuotagateProcess(tmp_path, database_url, redis_url, redis_prefix)
    await qg.start()
    upstream, upstream_port = await start_demo_upstream()
    envoy, envoy_port, admin_port = start_envoy_in_front(qg, upstream_port, tmp_path)
    channel = grpc.aio.insecure_channel(qg.target)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy_port}", timeout=30)
    try:
        await wait_envoy_ready(admin_port, process=envoy)
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await health.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        headers = {
            "authorization": f"Bearer {CLIENT_KEY}",
            "x-user-id": uid,
            "x-demo-chunk-delay-ms": "150",  # 12 words: the stream lasts about 2 s
            "x-demo-completion-tokens": "12",
        }
        body = {
            "model": "demo-small",
            "max_tokens": 40,
            "stream": True,
            "messages": [{"role": "user", "content": "a slow answer please"}],
        }
        events: list[tuple[str, float]] = []
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            chunks = response.aiter_bytes()
            received = await anext(chunks)
            assert qg.proc is not None
            os.kill(qg.proc.pid, signal.SIGTERM)
            events.append(("sigterm", time.monotonic()))

            async def not_serving() -> None:
                update = await health.read()
                assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
                events.append(("not_serving", time.monotonic()))

            watching = asyncio.create_task(not_serving())
            async for chunk in chunks:
                received += chunk
            events.append(("stream_done", time.monotonic()))
            assert qg.proc.alive()  # still draining when the stream ends
            await asyncio.wait_for(watching, timeout=10)
        assert b"data: [DONE]" in received

        async def exited() -> bool:
            assert qg.proc is not None
            return not qg.proc.alive()

        await eventually(exited, seconds=15, what="quotagate to exit after SIGTERM")
        events.append(("exited", time.monotonic()))
        assert qg.proc.returncode == 0, qg.log()
        order = [name for name, _ in sorted(events, key=lambda e: e[1])]
        assert order == ["sigterm", "not_serving", "stream_done", "exited"]

        # The stream's own usage was settled during the drain: 12 completion tokens, not an estimate.
        ledger = await ledger_of(database_url, uid)
        [event] = ledger["events"].values()
        assert (event["estimated"], event["source"]) == (False, "ext_proc")
        assert event["cost"] == 12 + 5  # completion + the demo upstream's prompt count (20 chars / 4)
        code, report = await reconcile(qg.config, {**os.environ, **qg.env})
        assert (code, report["drift"], report["reservations"]) == (0, [], 0)
    finally:
        await http.aclose()
        await channel.close()
        envoy.stop()
        await upstream.cleanup()
        qg.stop()
