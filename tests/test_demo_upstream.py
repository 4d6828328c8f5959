"""Tests for the fake OpenAI-compatible upstream used by `quotagate up` and e2e tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from quotagate import demo_upstream
from quotagate.demo_upstream import start_demo_upstream

CHAT = "/v1/chat/completions"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    runner, port = await start_demo_upstream("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            yield session
    finally:
        await runner.cleanup()


def _body(**extra: Any) -> dict[str, Any]:
    # "hello world!" is 12 characters -> 3 prompt tokens.
    return {"model": "demo-small", "messages": [{"role": "user", "content": "hello world!"}], **extra}


def _parse_sse(text: str) -> list[Any]:
    """Return the decoded `data:` payloads; '[DONE]' is kept as the string."""
    assert text.endswith("\n\n")
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_non_stream_usage_for_known_input(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json=_body()) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    assert data["model"] == "demo-small"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 16


async def test_prompt_tokens_count_text_parts_and_round_up(client: aiohttp.ClientSession) -> None:
    body = {
        "model": "demo-large",
        "messages": [
            {"role": "system", "content": "xyz"},  # 3 chars
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "abcde"},  # 5 chars
                    {"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}},
                ],
            },
        ],
        "max_tokens": 5,
    }
    async with client.post(CHAT, json=body) as resp:
        data = await resp.json()
    # 8 characters -> 2 prompt tokens; max_tokens 5 caps the completion.
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert len(data["choices"][0]["message"]["content"].split()) == 5


@pytest.mark.parametrize(("content", "expected"), [("", 1), ("a", 1), ("abcd", 1), ("abcde", 2)])
async def test_prompt_tokens_minimum_and_ceiling(client: aiohttp.ClientSession, content: str, expected: int) -> None:
    body = {"model": "demo-small", "messages": [{"role": "user", "content": content}]}
    async with client.post(CHAT, json=body) as resp:
        data = await resp.json()
    assert data["usage"]["prompt_tokens"] == expected


async def test_max_tokens_above_default_is_capped(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json=_body(max_tokens=1000)) as resp:
        data = await resp.json()
    assert data["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("forced", [0, 3, 250])
async def test_completion_tokens_header_is_exact(client: aiohttp.ClientSession, forced: int) -> None:
    headers = {"x-demo-completion-tokens": str(forced)}
    # max_tokens is ignored when the header is present, even when smaller.
    async with client.post(CHAT, json=_body(max_tokens=2), headers=headers) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": forced, "total_tokens": 3 + forced}
    assert len(data["choices"][0]["message"]["content"].split()) == forced


async def test_stream_chunks_parse_without_usage(client: aiohttp.ClientSession) -> None:
    headers = {"x-demo-completion-tokens": "4"}
    async with client.post(CHAT, json=_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = _parse_sse(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    # 4 word chunks plus the finish chunk; no usage chunk because include_usage was not asked for.
    assert len(chunks) == 5
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert len(text.split()) == 4
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


async def test_stream_include_usage_adds_usage_chunk(client: aiohttp.ClientSession) -> None:
    body = _body(stream=True, max_tokens=3, stream_options={"include_usage": True})
    async with client.post(CHAT, json=body) as resp:
        events = _parse_sse(await resp.text())
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    # Only the last chunk carries usage, as with OpenAI.
    assert all(chunk["usage"] is None for chunk in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_stream_include_usage_false_leaves_usage_out(client: aiohttp.ClientSession) -> None:
    body = _body(stream=True, max_tokens=2, stream_options={"include_usage": False})
    async with client.post(CHAT, json=body) as resp:
        events = _parse_sse(await resp.text())
    assert all(event == "[DONE]" or (event["choices"] and "usage" not in event) for event in events)


async def test_stream_chunk_delay(client: aiohttp.ClientSession) -> None:
    headers = {"x-demo-completion-tokens": "3", "x-demo-chunk-delay-ms": "50"}
    started = time.monotonic()
    async with client.post(CHAT, json=_body(stream=True), headers=headers) as resp:
        events = _parse_sse(await resp.text())
    elapsed = time.monotonic() - started
    # 5 events (3 words, finish, [DONE]) -> 4 gaps of 50 ms.
    assert len(events) == 5
    assert elapsed >= 0.19


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_forced_status_returns_openai_error(client: aiohttp.ClientSession, status: int) -> None:
    async with client.post(CHAT, json=_body(), headers={"x-demo-status": str(status)}) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        data = await resp.json()
    error = data["error"]
    assert str(status) in error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "code" in error
    if status == 429:
        assert error["type"] == "rate_limit_error"
    else:
        assert error["type"] == "server_error"


async def test_invalid_forced_status_is_rejected(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json=_body(), headers={"x-demo-status": "200"}) as resp:
        assert resp.status == 400
        assert "x-demo-status" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'{"model": "demo-small"}',
        b'{"messages": [{"role": "user", "content": "x"}]}',
    ],
)
async def test_bad_bodies_get_400(client: aiohttp.ClientSession, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    async with client.post(CHAT, data=raw, headers=headers) as resp:
        assert resp.status == 400
        data = await resp.json()
    assert data["error"]["type"] == "invalid_request_error"
    assert data["error"]["message"]


async def test_models_list(client: aiohttp.ClientSession) -> None:
    async with client.get("/v1/models") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data == {
        "object": "list",
        "data": [{"id": "demo-small", "object": "model"}, {"id": "demo-large", "object": "model"}],
    }


async def test_recorded_requests_contain_headers_and_body(client: aiohttp.ClientSession) -> None:
    headers = {"Authorization": "Bearer upstream-key", "X-Quota-User": "alice"}
    async with client.post(CHAT, json=_body(), headers=headers) as resp:
        assert resp.status == 200
    async with client.post(CHAT, data=b"{broken", headers={"x-demo-status": "502"}) as resp:
        assert resp.status == 502

    async with client.get("/_demo/requests") as resp:
        recorded = await resp.json()
    # /_demo/ calls themselves are not recorded.
    assert [(r["method"], r["path"]) for r in recorded] == [("POST", CHAT), ("POST", CHAT)]
    first, second = recorded
    assert first["headers"]["authorization"] == "Bearer upstream-key"
    assert first["headers"]["x-quota-user"] == "alice"
    assert all(name == name.lower() for name in first["headers"])
    assert first["body"] == _body()
    assert second["headers"]["x-demo-status"] == "502"
    assert second["body"] is None

    async with client.delete("/_demo/requests") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"cleared": 2}
    async with client.get("/_demo/requests") as resp:
        assert await resp.json() == []


async def test_recorded_requests_are_bounded(client: aiohttp.ClientSession) -> None:
    for _ in range(demo_upstream.MAX_RECORDED_REQUESTS + 5):
        async with client.get("/v1/models") as resp:
            assert resp.status == 200
    async with client.get("/_demo/requests") as resp:
        recorded = await resp.json()
    assert len(recorded) == demo_upstream.MAX_RECORDED_REQUESTS


def test_main_runs_as_module_subprocess() -> None:
    src_dir = Path(demo_upstream.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src_dir), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotagate.demo_upstream", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("demo upstream listening on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
            assert json.load(resp)["object"] == "list"
    finally:
        proc.terminate()
        # SIGTERM is handled: the server cleans up and exits 0.
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
