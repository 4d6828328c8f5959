"""The pipelined Redis connection used by Check, against real Redis servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from quotagate.core.errors import StoreUnavailable
from quotagate.procs import free_port, start_redis, wait_for_port
from quotagate.store.resp import PipelinedRedis, Script


async def test_concurrent_commands_each_get_their_own_reply(redis_url: str) -> None:
    client = PipelinedRedis(redis_url)
    try:
        replies = await asyncio.gather(*(client.execute("ECHO", f"message-{i}") for i in range(500)))
        assert replies == [f"message-{i}" for i in range(500)]
    finally:
        client.close()


async def test_evalsha_loads_the_script_when_redis_lost_it(redis_url: str, redis_prefix: str) -> None:
    script = Script("return {KEYS[1], ARGV[1] + 1}")
    client = PipelinedRedis(redis_url)
    plain = aioredis.Redis.from_url(redis_url)
    try:
        await plain.script_flush()
        assert await client.evalsha(script, [redis_prefix + "k"], [41]) == [redis_prefix + "k", 42]
        assert (await plain.script_exists(script.sha)) == [True]
    finally:
        client.close()
        await plain.aclose()


async def test_a_failing_script_is_a_store_error_with_the_reason(redis_url: str) -> None:
    client = PipelinedRedis(redis_url)
    try:
        with pytest.raises(StoreUnavailable, match="script failed"):
            await client.evalsha(Script("return redis.call('NOSUCHCOMMAND')"), [], [])
    finally:
        client.close()


async def test_unreachable_redis_is_store_unavailable() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await client.execute("PING")


async def test_reconnects_after_redis_restarts(tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(tmp_path / "a", port)
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0")
    try:
        await wait_for_port("127.0.0.1", port, process=server)
        assert await client.execute("PING") == "PONG"
        server.stop()
        with pytest.raises(StoreUnavailable):
            await client.execute("PING")
        server = start_redis(tmp_path / "b", port)
        await wait_for_port("127.0.0.1", port, process=server)
        assert await client.execute("PING") == "PONG"
    finally:
        client.close()
        server.stop()


async def test_selects_the_database_in_the_url(redis_url: str, redis_prefix: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    client = PipelinedRedis(f"{base}/3")
    plain = aioredis.Redis.from_url(f"{base}/3", decode_responses=True)
    try:
        await client.execute("SET", redis_prefix + "db", "three")
        assert await plain.get(redis_prefix + "db") == "three"
    finally:
        await plain.delete(redis_prefix + "db")
        client.close()
        await plain.aclose()


async def test_a_server_that_never_answers_is_a_store_error_not_a_hang() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the command, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(client.execute("PING"), client.execute("PING"), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) and "no reply within 0.2s" in str(r) for r in results)
        assert loop.time() - started < 2
    finally:
        client.close()
        server.close()
        await server.wait_closed()
