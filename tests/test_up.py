"""`quotagate up` as a user runs it: the whole stack from one command, usable at once, stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import pytest

from quotagate.config import DEFAULT_LINK_SECRET, load_settings
from quotagate.links import BadLink, LinkSigner
from quotagate.procs import free_port
from quotagate.secrets_file import state_secret
from quotagate.up import LINK_SECRET_FILE, demo_config_path, with_own_link_secret
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


# -- the secrets `up` makes for a state dir (unit level: no stack needed) -------------------------------------


def test_a_state_secret_is_made_once_private_and_reused_and_differs_between_state_dirs(tmp_path: Path) -> None:
    first = state_secret(tmp_path / "a", "link-secret")
    assert len(first) >= 32
    assert (tmp_path / "a" / "link-secret").stat().st_mode & 0o777 == 0o600
    assert state_secret(tmp_path / "a", "link-secret") == first  # the next run
    assert state_secret(tmp_path / "b", "link-secret") != first
    assert state_secret(tmp_path / "a", "grpc-token") != first  # one secret per name
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grpc-token", "link-secret"]  # no drafts left


def test_runs_starting_together_agree_on_one_secret_and_an_empty_file_is_replaced(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda _: state_secret(tmp_path, "link-secret"), range(32)))
    assert len(made) == 1
    (tmp_path / "empty").touch()
    assert len(state_secret(tmp_path, "empty")) >= 32


def test_up_signs_links_with_the_state_dirs_secret_not_the_public_default(tmp_path: Path) -> None:
    def up_settings(state: Path, **env: str) -> LinkSigner:
        state.mkdir(exist_ok=True)
        settings = with_own_link_secret(load_settings(demo_config_path(state), env), state)
        return LinkSigner(settings.link_secret.encode(), settings.public_url)

    now = datetime.now(UTC)
    signer = up_settings(tmp_path / "one")
    forged = LinkSigner(DEFAULT_LINK_SECRET.encode(), signer.public_url).token("alice@example.com", now)
    with pytest.raises(BadLink):
        signer.verify(forged, now)
    assert signer.secret.decode() == (tmp_path / "one" / LINK_SECRET_FILE).read_text().strip()
    assert up_settings(tmp_path / "one").secret == signer.secret  # the same links work after a restart
    assert up_settings(tmp_path / "two").secret != signer.secret
    # A secret the operator gave is kept, and no file is made.
    given = up_settings(tmp_path / "three", QUOTAGATE_LINK_SECRET="the-operators-own-secret")
    assert given.secret == b"the-operators-own-secret"
    assert not (tmp_path / "three" / LINK_SECRET_FILE).exists()
