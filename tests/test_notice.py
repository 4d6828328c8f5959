"""The warning inside the conversation, through a real Envoy with ext_proc, read with the openai SDK: the first
completion after crossing warn (and again critical) carries a notice, once per threshold per cycle, and the
notice is never charged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from harness import CLIENT_KEY, Stack, make_settings

from quotagate.core.clock import FixedClock
from quotagate.core.messages import Language, format_reset
from quotagate.core.model import Balance
from quotagate.links import LinkSigner
from quotagate.store.notices import PostgresNoticeBook

NOTICE_MARK = "⚠️"


def settings_for(database_url: str, redis_url: str, prefix: str, **overrides: Any) -> Any:
    return make_settings(
        database_url, redis_url, prefix, link_secret="test-link-secret", public_url="https://chat.example.com",
        **overrides,
    )  # fmt: skip


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path, ext_proc=True) as running:
        yield running


def client(stack: Stack, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{stack.envoy_port}/v1",
        api_key=CLIENT_KEY,
        default_headers={"x-user-id": user},
        max_retries=0,
        timeout=30,
    )


async def ask(stack: Stack, user: str, *, tokens: int = 5, stream: bool = False, usage: bool = False) -> str:
    """One completion through the SDK; returns the text the user reads."""
    async with client(stack, user) as sdk:
        return await _ask(sdk, tokens=tokens, stream=stream, usage=usage)


async def _ask(sdk: openai.AsyncOpenAI, *, tokens: int, stream: bool, usage: bool) -> str:
    messages: Any = [{"role": "user", "content": "hello there"}]
    extra = {"x-demo-completion-tokens": str(tokens)}
    if not stream:
        answer = await sdk.chat.completions.create(
            model="demo-small", messages=messages, max_tokens=10, extra_headers=extra
        )
        return answer.choices[0].message.content or ""
    chunks = await sdk.chat.completions.create(
        model="demo-small",
        messages=messages,
        max_tokens=10,
        stream=True,
        extra_headers=extra,
        **({"stream_options": {"include_usage": True}} if usage else {}),
    )
    parts = []
    async for chunk in chunks:  # the SDK parses every event: a malformed one would raise here
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def balance(stack: Stack, user: str) -> Balance:
    assert stack.quotagate is not None
    deadline = time.monotonic() + 10
    while True:
        _, live = await stack.quotagate.service.account(user)
        if live.reserved == 0 or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.05)


async def costs(stack: Stack, user: str) -> list[int]:
    assert stack.quotagate is not None
    events = await stack.quotagate.service.ledger.usage_events(user)  # type: ignore[attr-defined]
    return [int(e["cost"]) for e in events]


async def to_warn(stack: Stack, user: str) -> None:
    # 3 prompt tokens + 800 completion tokens of 1000: 80.3%, warn.
    assert (await stack.chat(user, completion_tokens=800, max_tokens=900)).status_code == 200
    assert (await balance(stack, user)).state.value == "warn"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_notice_once_at_warn_and_once_at_critical(stack: Stack, uid: str, stream: bool) -> None:
    await to_warn(stack, uid)
    first = await ask(stack, uid, stream=stream)
    assert first.startswith("token token token token token")
    assert first.count(NOTICE_MARK) == 1
    after = await balance(stack, uid)
    # What is left after this completion, and the reset date as the user reads it.
    assert f"{after.remaining} left" in first
    assert format_reset(after.resets_at, stack.settings.timezone, Language.EN) in first
    assert "write to creditos@example.com" in first
    link = first.split("Your balance: ", 1)[1].split()[0]
    assert link.startswith("https://chat.example.com/v1/quota?t=")
    assert LinkSigner(b"test-link-secret", "").verify(link.split("t=", 1)[1], after.resets_at) == uid

    for _ in range(2):  # shown: the next completions are plain
        assert NOTICE_MARK not in await ask(stack, uid, stream=stream)

    # 95%: the critical notice, once.
    assert (await stack.chat(uid, completion_tokens=150, max_tokens=200)).status_code == 200
    critical = await ask(stack, uid, stream=stream)
    assert critical.count(NOTICE_MARK) == 1 and "running out" in critical
    assert NOTICE_MARK not in await ask(stack, uid, stream=stream)

    assert stack.quotagate is not None
    book = PostgresNoticeBook(stack.quotagate.service.ledger.pool)  # type: ignore[attr-defined]
    assert [row["threshold"] for row in await book.shown(uid)] == ["warn", "critical"]


async def test_the_notice_is_not_charged(stack: Stack, uid: str) -> None:
    """The same request costs the same with and without the notice: the charge is the provider's usage."""
    quiet = uid + "-quiet"
    await to_warn(stack, uid)
    assert NOTICE_MARK in await ask(stack, uid, tokens=7)
    assert NOTICE_MARK not in await ask(stack, quiet, tokens=7)
    await balance(stack, uid)
    await balance(stack, quiet)  # normal state: settled just after the answer, not before it
    # 3 prompt tokens + 7 completion tokens each, as the demo upstream reports them.
    assert (await costs(stack, uid))[-1] == (await costs(stack, quiet))[-1] == 10

    streamed = uid + "-streamed"
    await to_warn(stack, streamed)
    assert NOTICE_MARK in await ask(stack, streamed, tokens=7, stream=True)
    assert NOTICE_MARK not in await ask(stack, quiet, tokens=7, stream=True)
    await balance(stack, streamed)
    assert (await costs(stack, streamed))[-1] == (await costs(stack, quiet))[-1] == 10


async def test_stream_with_usage_keeps_its_usage_and_order(stack: Stack, uid: str) -> None:
    """With include_usage the client still gets the provider's usage chunk; the notice chunk has the stream's
    id and model and comes before [DONE]."""
    await to_warn(stack, uid)
    async with client(stack, uid) as sdk:
        chunks = [
            chunk
            async for chunk in await sdk.chat.completions.create(
                model="demo-small",
                messages=[{"role": "user", "content": "hello there"}],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-demo-completion-tokens": "4"},
            )
        ]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(3, 4)]
    notices = [c for c in chunks if c.choices and NOTICE_MARK in (c.choices[0].delta.content or "")]
    assert len(notices) == 1
    assert {c.id for c in chunks} == {notices[0].id} and notices[0].model == "demo-small"
    assert chunks.index(notices[0]) == len(chunks) - 1  # after the usage chunk, the last before [DONE]


async def test_concurrent_completions_show_the_notice_once(stack: Stack, uid: str) -> None:
    await to_warn(stack, uid)
    texts = await asyncio.gather(*(ask(stack, uid, stream=i % 2 == 1) for i in range(6)))
    assert sum(text.count(NOTICE_MARK) for text in texts) == 1


async def test_the_claim_is_atomic_across_processes(stack: Stack, uid: str) -> None:
    """Two processes' books (each with its own memory) claiming at once: PostgreSQL lets exactly one win."""
    await to_warn(stack, uid)
    assert stack.quotagate is not None
    pool = stack.quotagate.service.ledger.pool  # type: ignore[attr-defined]
    books = [PostgresNoticeBook(pool), PostgresNoticeBook(pool)]
    now = datetime.now(UTC)
    claims = await asyncio.gather(*(books[i % 2].claim(uid, "2026-11", "warn", f"r{i}", now) for i in range(10)))
    assert claims.count(True) == 1
    # Once known, a book answers from memory, and other thresholds and cycles are claims of their own.
    assert not await books[0].claim(uid, "2026-11", "warn", "again", now)
    assert await books[1].claim(uid, "2026-11", "critical", "r", now)
    assert await books[0].claim(uid, "2026-12", "warn", "r", now)


async def test_a_new_cycle_brings_the_notices_back(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    clock = FixedClock(datetime(2026, 11, 20, 15, 0, tzinfo=UTC))
    settings = settings_for(database_url, redis_url, redis_prefix)
    async with Stack(settings, tmp_path, clock=clock, ext_proc=True) as stack:
        await to_warn(stack, uid)
        assert NOTICE_MARK in await ask(stack, uid)
        assert NOTICE_MARK not in await ask(stack, uid)
        clock.set(datetime(2026, 12, 5, 15, 0, tzinfo=UTC))  # December in São Paulo: a new cycle
        assert NOTICE_MARK not in await ask(stack, uid)  # normal again
        await to_warn(stack, uid)
        december = await ask(stack, uid)
        assert december.count(NOTICE_MARK) == 1 and "2027-01-01 00:00" in december


async def test_notices_can_be_turned_off(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = settings_for(database_url, redis_url, redis_prefix, notices={"in_conversation": False})
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        await to_warn(stack, uid)
        for stream in (False, True):
            assert NOTICE_MARK not in await ask(stack, uid, stream=stream)
        warned = await stack.chat(uid)
        assert warned.headers["x-token-warning"] == "true"  # the headers stay


async def test_notice_in_portuguese(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = settings_for(database_url, redis_url, redis_prefix, language="pt-BR")
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        await to_warn(stack, uid)
        text = await ask(stack, uid)
        after = await balance(stack, uid)
        assert f"restam {after.remaining} até a renovação em " in text
        assert format_reset(after.resets_at, settings.timezone, Language.PT_BR) in text
        assert "escreva para creditos@example.com" in text


async def test_raw_bodies_stay_well_formed(stack: Stack, uid: str) -> None:
    """Byte for byte: the JSON answer's length matches its content-length; the stream ends with [DONE]."""
    await to_warn(stack, uid)
    answer = await stack.chat(uid, completion_tokens=3)
    assert NOTICE_MARK in answer.json()["choices"][0]["message"]["content"]
    if "content-length" in answer.headers:
        assert int(answer.headers["content-length"]) == len(answer.content)

    await stack.chat(uid, completion_tokens=150, max_tokens=200)
    streamed = await stack.chat(uid, completion_tokens=3, stream=True)
    events = [block for block in streamed.text.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    assert NOTICE_MARK.encode("unicode_escape").decode() in events[-2] or NOTICE_MARK in events[-2]
    assert sum(NOTICE_MARK in e or "\\u26a0" in e for e in events) == 1
