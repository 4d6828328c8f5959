"""The child-process helpers against the real binaries: Redis, Envoy (fail-closed/open), PostgreSQL."""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from quotagate.envoyconf import EnvoyOptions, write_envoy_config
from quotagate.procs import (
    ManagedProcess,
    free_port,
    start_embedded_postgres,
    start_envoy,
    start_redis,
    wait_envoy_ready,
    wait_for_port,
)


@dataclass
class Upstream:
    port: int
    seen: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A tiny OpenAI-ish upstream that records what reached it."""
    state = Upstream(port=free_port())

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        state.seen.append((request.path, len(body)))
        return web.json_response({"object": "chat.completion", "path": request.path, "body_len": len(body)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", state.port).start()
        yield state
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_envoy(tmp_path: pathlib.Path, opts: EnvoyOptions) -> AsyncIterator[ManagedProcess]:
    config = write_envoy_config(opts, tmp_path / "envoy.yaml")
    proc = start_envoy(config, tmp_path / "envoy.log")
    try:
        await wait_envoy_ready(opts.admin_port, timeout=30, process=proc)
        yield proc
    finally:
        assert await proc.stop_async() == 0  # Envoy exits cleanly on SIGTERM
        assert not proc.alive()


def envoy_options(
    upstream_port: int, *, failure_mode_allow: bool = False, max_request_bytes: int = 65536
) -> EnvoyOptions:
    # authz_port: a port nobody listens on, so every Check fails to connect.
    return EnvoyOptions(
        upstream_host="127.0.0.1",
        upstream_port=upstream_port,
        listen_port=free_port(),
        admin_port=free_port(),
        authz_port=free_port(),
        failure_mode_allow=failure_mode_allow,
        max_request_bytes=max_request_bytes,
    )


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_envoy_fails_closed_with_status_on_error(tmp_path: pathlib.Path, upstream: Upstream) -> None:
    opts = envoy_options(upstream.port)
    async with running_envoy(tmp_path, opts), aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{opts.listen_port}/v1/chat/completions"
        async with session.post(url, json=CHAT) as response:
            assert response.status == 503
    assert upstream.seen == []


async def test_envoy_fails_open_when_allowed(tmp_path: pathlib.Path, upstream: Upstream) -> None:
    opts = envoy_options(upstream.port, failure_mode_allow=True, max_request_bytes=4096)
    async with running_envoy(tmp_path, opts), aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{opts.listen_port}/v1/chat/completions"
        async with session.post(url, json=CHAT) as response:
            assert response.status == 200
            payload = await response.json()
        assert payload["path"] == "/v1/chat/completions"
        # allow_partial_message: false → a body over max_request_bytes is refused before any Check.
        async with session.post(url, data=b"x" * 4097) as response:
            assert response.status == 413
    assert upstream.seen == [("/v1/chat/completions", payload["body_len"])]


async def test_redis_starts_and_answers_ping(tmp_path: pathlib.Path) -> None:
    port = free_port()
    proc = start_redis(tmp_path / "redis", port)
    try:
        await wait_for_port("127.0.0.1", port, timeout=20, process=proc)
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            assert await client.ping() is True
            await client.set("quotagate:test", "1")
            assert await client.get("quotagate:test") == b"1"
        finally:
            await client.aclose()
    finally:
        proc.stop()
    assert not proc.alive()
    assert not (tmp_path / "redis" / "dump.rdb").exists()


async def test_embedded_postgres_accepts_asyncpg(tmp_path: pathlib.Path) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    uri, stop = start_embedded_postgres(tmp_path / "pg")
    try:
        conn = await asyncpg.connect(uri)
        try:
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()
    finally:
        stop()
        stop()  # idempotent
    assert not (tmp_path / "pg" / "postmaster.pid").exists()


async def test_wait_for_port_times_out_with_address() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        await wait_for_port("127.0.0.1", port, timeout=0.3)


async def test_wait_fails_fast_when_process_dies(tmp_path: pathlib.Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "die.log")
    proc.start()
    with pytest.raises(RuntimeError, match="boom"):
        await wait_for_port("127.0.0.1", free_port(), timeout=20, process=proc)
    assert proc.returncode == 3


def _state(pid: int) -> str | None:
    # A killed orphan may linger as a zombie when PID 1 does not reap; that counts as dead.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_stop_escalates_to_sigkill_and_kills_the_group(tmp_path: pathlib.Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = ManagedProcess([sys.executable, "-c", script], tmp_path / "stubborn.log").start()
    try:
        deadline = time.monotonic() + 20
        while "ready" not in proc.log_tail():
            assert proc.alive(), proc.log_tail()
            assert time.monotonic() < deadline, "child never got ready"
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        assert _state(grandchild) not in (None, "Z")
        assert proc.stop(timeout=0.5) == -9  # SIGTERM ignored → SIGKILL
        assert not proc.alive()
        # SIGKILL is delivered asynchronously; give the kernel a moment.
        deadline = time.monotonic() + 5
        while _state(grandchild) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(grandchild) in (None, "Z")
        assert proc.log_tail(1) == "ready"
    finally:
        proc.kill()
