"""Shared fixtures: a real PostgreSQL and a real Redis for the whole session.

QUOTAGATE_TEST_DATABASE_URL / QUOTAGATE_TEST_REDIS_URL point at running servers (CI has both on
127.0.0.1); without them the embedded servers from the venv are started, so the suite passes on a fresh
laptop too. Each session gets its own database, and each test its own Redis key prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from harness import forget_prefix

from quotagate.procs import free_port, start_embedded_postgres, start_redis, wait_for_port


@pytest.fixture(scope="session")
def server_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("QUOTAGATE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    uri, stop = start_embedded_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield uri
    finally:
        stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
async def database_url(server_database_url: str) -> AsyncIterator[str]:
    """A fresh, empty database on the test server, dropped at the end of the session."""
    name = f"quotagate_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(server_database_url, name)
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    url = os.environ.get("QUOTAGATE_TEST_REDIS_URL")
    if url:
        yield url
        return
    port = free_port()
    proc = start_redis(Path(tmp_path_factory.mktemp("redis")), port)
    try:
        await wait_for_port("127.0.0.1", port, process=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"
    yield prefix
    await forget_prefix(redis_url, prefix)


@pytest.fixture
def uid() -> str:
    """A user id no other test uses (all tests share one database)."""
    return f"user-{uuid.uuid4().hex[:10]}"
