"""`quotagate up` as a user runs it: the whole stack from one command, usable at once, stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import grpc
import httpx

from quotagate.procs import free_port
from quotagate.v1 import admin_pb2, admin_pb2_grpc


async def _read_until(stream: asyncio.StreamReader, marker: str, seconds: float) -> str:
    seen = ""
    async with asyncio.timeout(seconds):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"quotagate up ended before printing {marker!r}:\n{seen}")
            seen += line.decode()
    return seen


async def _nothing_reserved(admin: admin_pb2_grpc.AdminStub, token: str, user: str) -> None:
    """Waits for the last answer's charge, which lands just after it when the user is far from every threshold:
    a person typing the next message never outruns it, this loop would."""
    deadline = time.monotonic() + 10
    request = admin_pb2.GetAccountRequest(user_id=user)
    while (await admin.GetAccount(request, metadata=[("authorization", f"Bearer {token}")])).balance.reserved:
        assert time.monotonic() < deadline, "the last answer was never charged"
        await asyncio.sleep(0.02)


async def test_up_runs_the_stack_reaches_blocked_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QUOTAGATE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quotagate.cli",
        "up",
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    try:
        banner = await _read_until(proc.stdout, "Ctrl-C stops everything.", seconds=90)
        assert f"http://127.0.0.1:{port}" in banner
        assert "demo-key" in banner and "curl" in banner

        server = re.search(r"--server (127\.0\.0\.1:\d+) --token (\S+)", banner)
        assert server, banner
        states: list[str] = []
        body = {"model": "demo-small", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}
        headers = {"authorization": "Bearer demo-key", "x-user-id": "alice@example.com"}
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
            grpc.aio.insecure_channel(server.group(1)) as channel,
        ):
            admin = admin_pb2_grpc.AdminStub(channel)
            for i in range(40):
                if i:  # (the account is made by the first request)
                    await _nothing_reserved(admin, server.group(2), "alice@example.com")
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
                if response.status_code == 429:
                    assert response.json()["error"]["code"] == "quota_exceeded"
                    states.append("blocked")
                    break
                assert response.status_code == 200, response.text
                states.append(response.headers["x-quota-state"])
        # The demo upstream reports each completion's usage, so the demo allowance runs out within a minute.
        assert states[0] == "normal" and states[-1] == "blocked", states
        assert "warn" in states and "critical" in states, " ".join(states)
        assert states.index("normal") < states.index("warn") < states.index("critical") < states.index("blocked")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
    assert code == 0
    async with httpx.AsyncClient() as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/", timeout=2)
            still_listening = True
        except httpx.ConnectError:
            still_listening = False
    assert not still_listening, "Envoy kept running after Ctrl-C"
