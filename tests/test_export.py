"""Admin.ExportUsage: usage events streamed as CSV or JSON lines from a server-side cursor, and
`quotagate admin export`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from harness import ADMIN_TOKEN, make_settings

from quotagate.config import sha256_hex
from quotagate.server import Running, start
from quotagate.service import EXPORT_FIELDS
from quotagate.v1 import admin_pb2, admin_pb2_grpc

VIEWER_TOKEN = "test-viewer-token-export"


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Running]:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin_tokens=[{"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"}],
    )
    running = await start(settings)
    yield running
    await running.stop()


async def add_account(conn: asyncpg.Connection, user: str) -> None:
    await conn.execute("INSERT INTO accounts (user_id, plan_id) VALUES ($1, 'small')", user)


async def export(running: Running, token: str = VIEWER_TOKEN, **fields: str) -> list[bytes]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
        stream = admin_pb2_grpc.AdminStub(channel).ExportUsage(
            admin_pb2.ExportUsageRequest(**fields), metadata=[("authorization", f"Bearer {token}")]
        )
        return [chunk.data async for chunk in stream]


# 2019-07 in America/Sao_Paulo (UTC-3): from 2019-07-01T03:00Z to 2019-08-01T03:00Z.
KNOWN = [
    ("a", "exp-1", "demo-small", 100, 20, 120, "succeeded", False, "ext_proc", datetime(2019, 7, 1, 3, 0, tzinfo=UTC)),
    ("b", "exp-2", 'demo, "large"', 30, 5, 35, "succeeded", True, "expired", datetime(2019, 7, 10, tzinfo=UTC)),
    ("a", "exp-3", "demo-small", 7, 0, 0, "failed", False, "api", datetime(2019, 7, 20, tzinfo=UTC)),
    # Outside the cycle: a minute before it starts, and at its exclusive end.
    ("a", "exp-0", "demo-small", 1, 1, 2, "succeeded", False, "api", datetime(2019, 7, 1, 2, 59, tzinfo=UTC)),
    ("a", "exp-9", "demo-small", 1, 1, 2, "succeeded", False, "api", datetime(2019, 8, 1, 3, 0, tzinfo=UTC)),
]


async def insert_known(database_url: str, uid: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await add_account(conn, f"{uid}-a")
        await add_account(conn, f"{uid}-b")
        await conn.executemany(
            """INSERT INTO usage_events (user_id, request_id, model, prompt_tokens, completion_tokens, cost, status,
                   estimated, source, occurred_at, cycle)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '2019-07')""",
            [(f"{uid}-{u}", f"{uid}-{r}", *rest) for u, r, *rest in KNOWN],
        )
    finally:
        await conn.close()


async def test_csv_and_jsonl_of_known_rows(server: Running, database_url: str, uid: str) -> None:
    await insert_known(database_url, uid)
    text = b"".join(await export(server, user_id=f"{uid}-a", cycle="2019-07", format="csv")).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(EXPORT_FIELDS)
    assert [r[:10] for r in rows[1:]] == [
        [f"{uid}-exp-1", f"{uid}-a", "demo-small", "100", "20", "120", "2019-07", "succeeded", "false", "ext_proc"],
        [f"{uid}-exp-3", f"{uid}-a", "demo-small", "7", "0", "0", "2019-07", "failed", "false", "api"],
    ]
    assert datetime.fromisoformat(rows[1][10]) == datetime(2019, 7, 1, 3, 0, tzinfo=UTC)

    # Every account in the cycle; a model name with a comma and quotes survives the CSV round trip.
    everyone = b"".join(await export(server, cycle="2019-07", format="CSV")).decode()
    mine = [r for r in csv.reader(io.StringIO(everyone)) if r[1].startswith(uid)]
    assert [r[0] for r in mine] == [f"{uid}-exp-1", f"{uid}-exp-2", f"{uid}-exp-3"]
    assert mine[1][2] == 'demo, "large"' and mine[1][8] == "true"

    lines = b"".join(await export(server, user_id=f"{uid}-b", cycle="2019-07", format="jsonl")).decode()
    assert lines.endswith("\n")
    records = [json.loads(line) for line in lines.splitlines()]
    assert len(records) == 1
    record = records[0]
    assert list(record) == list(EXPORT_FIELDS)
    assert record["model"] == 'demo, "large"' and record["estimated"] is True and record["cost"] == 35
    assert datetime.fromisoformat(record["occurred_at"]) == datetime(2019, 7, 10, tzinfo=UTC)


async def test_bad_requests_and_roles(server: Running, uid: str) -> None:
    for fields, code in [
        ({"format": "xml"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"format": "csv", "cycle": "2019-13"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"format": "csv", "user_id": "x" * 300}, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await export(server, **fields)
        assert caught.value.code() == code, fields
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(server, token="wrong", format="csv")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # An account with no usage in the range: the header only.
    assert b"".join(await export(server, user_id=uid, format="csv")).decode().splitlines() == [",".join(EXPORT_FIELDS)]


async def test_ten_thousand_rows_stream_in_batches(server: Running, database_url: str, uid: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await add_account(conn, uid)
        await conn.execute(
            """INSERT INTO usage_events (request_id, user_id, model, prompt_tokens, completion_tokens, cost, cycle,
                   occurred_at)
               SELECT $1 || '-' || lpad(i::text, 5, '0'), $2, 'demo-small', i, 1, i + 1, '2019-05',
                      timestamptz '2019-05-02 00:00:00+00' + i * interval '1 second'
               FROM generate_series(1, 10000) AS i""",
            uid,
            uid,
        )
    finally:
        await conn.close()
    chunks = await export(server, user_id=uid, cycle="2019-05", format="csv")
    assert len(chunks) == 11  # the header, then one chunk per batch of 1,000 rows
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert len(rows) == 10_001
    assert [r[0] for r in rows[1:]] == [f"{uid}-{i:05d}" for i in range(1, 10_001)]
    assert sum(int(r[5]) for r in rows[1:]) == sum(i + 1 for i in range(1, 10_001))

    chunks = await export(server, user_id=uid, cycle="2019-05", format="jsonl")
    assert len(chunks) == 10
    assert sum(chunk.count(b"\n") for chunk in chunks) == 10_000


async def cli(running: Running, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, bytes, str]:
    env = {**os.environ, "QUOTAGATE_ADMIN_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "admin", "--server", f"127.0.0.1:{running.grpc_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out, err.decode()


async def test_cli_export_to_stdout_and_file(server: Running, database_url: str, uid: str, tmp_path: Path) -> None:
    await insert_known(database_url, uid)
    code, out, err = await cli(server, "export", "--user", f"{uid}-a", "--cycle", "2019-07", "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out.decode())))
    assert rows[0] == list(EXPORT_FIELDS) and [r[0] for r in rows[1:]] == [f"{uid}-exp-1", f"{uid}-exp-3"]

    target = tmp_path / "usage.jsonl"
    code, out, err = await cli(
        server, "export", "--cycle", "2019-07", "--format", "jsonl", "-o", str(target), token=VIEWER_TOKEN
    )
    assert code == 0, err
    assert out == b"" and f"to {target}" in err
    mine = [json.loads(line) for line in target.read_text().splitlines() if f'"{uid}-' in line]
    assert [r["request_id"] for r in mine] == [f"{uid}-exp-1", f"{uid}-exp-2", f"{uid}-exp-3"]

    code, out, err = await cli(server, "export", "--cycle", "2019-13", "--format", "csv")
    assert code == 2 and out == b"" and "invalid_argument" in err
