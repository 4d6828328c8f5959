"""Usage captured by quotagate itself through Envoy's ext_proc: JSON and SSE answers, usage asked for on the
client's behalf, estimates when usage is missing or the client leaves, errors not charged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from harness import CLIENT_KEY, Stack, make_settings

from quotagate.envoyconf import ASK_USAGE_HEADER, SETTLE_FIRST_HEADER
from quotagate.v1 import admin_pb2


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = make_settings(
        database_url, redis_url, redis_prefix, plans=[{"id": "ext-proc-100k", "monthly_allowance": 100_000}]
    )
    async with Stack(settings, tmp_path, ext_proc=True) as running:
        yield running


def body(content: str = "hello there", *, stream: bool = False, include_usage: bool | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": "demo-small",
        "max_tokens": 500,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }
    if include_usage is not None:
        data["stream_options"] = {"include_usage": include_usage}
    return data


def headers(user: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user, **extra}


def sse_events(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def settled(stack: Stack, user: str, charged: bool = True) -> admin_pb2.Account:
    """The account once nothing is reserved any more (ext_proc settles right after the body's end)."""
    deadline = time.monotonic() + 10
    while True:
        account = await stack.account(user)
        if account.balance.reserved == 0 and (account.balance.allowance_used > 0) is charged:
            return account
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: {account.balance}")
        await asyncio.sleep(0.05)


async def streams(stack: Stack) -> tuple[int, int]:
    """How many ext_proc streams Envoy opened so far: (watched, held)."""
    counters = await stack.envoy_counters("http.ingress.ext_proc.")
    return counters.get("http.ingress.ext_proc.watch.streams_started", 0), counters.get(
        "http.ingress.ext_proc.streams_started", 0
    )


async def usage_events(stack: Stack, user: str) -> list[dict[str, Any]]:
    assert stack.quotagate is not None
    events: list[dict[str, Any]] = await stack.quotagate.service.ledger.usage_events(user)  # type: ignore[attr-defined]
    return events


async def test_json_answer_is_charged_its_reported_usage(stack: Stack, uid: str) -> None:
    response = await stack.http.post(
        "/v1/chat/completions", json=body("x" * 40), headers=headers(uid, **{"x-demo-completion-tokens": "7"})
    )
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (10, 7)
    # Far from every threshold the answer does not wait for the charge, which lands just after it.
    account = await settled(stack, uid)
    assert (account.balance.allowance_used, account.balance.reserved) == (17, 0)
    [event] = await usage_events(stack, uid)
    assert (event["request_id"], event["source"], event["estimated"]) == (
        response.headers["x-request-id"],
        "ext_proc",
        False,
    )


async def test_stream_with_usage_asked_by_the_client_is_passed_on_and_charged(stack: Stack, uid: str) -> None:
    response = await stack.http.post(
        "/v1/chat/completions",
        json=body("y" * 80, stream=True, include_usage=True),
        headers=headers(uid, **{"x-demo-completion-tokens": "12"}),
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    usage = [e["usage"] for e in events[:-1] if e.get("usage")]
    assert usage == [{"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}]
    assert (await settled(stack, uid)).balance.allowance_used == 32


async def test_stream_without_usage_gets_it_asked_for_and_the_client_sees_a_clean_stream(
    stack: Stack, uid: str
) -> None:
    response = await stack.http.post(
        "/v1/chat/completions",
        json=body("z" * 20, stream=True),
        headers=headers(uid, **{"x-demo-completion-tokens": "9"}),
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in e for e in chunks)  # what the client did not ask for, it does not get
    assert all(e["choices"] for e in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.split() == ["token"] * 9
    upstream = (await stack.upstream_requests())[-1]
    assert upstream["body"]["stream_options"] == {"include_usage": True}
    # Check's routing mark (to the route where ext_proc sees the request) stays between Envoy and quotagate.
    assert ASK_USAGE_HEADER not in upstream["headers"]
    assert (await settled(stack, uid)).balance.allowance_used == 5 + 9


async def test_missing_usage_is_estimated_from_what_was_seen(stack: Stack, uid: str) -> None:
    response = await stack.http.post(
        "/v1/chat/completions",
        json=body("w" * 400, stream=True),
        headers=headers(uid, **{"x-demo-completion-tokens": "40", "x-demo-no-usage": "1"}),
    )
    assert response.status_code == 200
    account = await settled(stack, uid)
    # 400 prompt characters -> 100 tokens; 40 streamed words ("token" and " token": 239 characters) -> 60.
    assert account.balance.allowance_used == 100 + 60
    [event] = await usage_events(stack, uid)
    assert event["estimated"] is True and event["source"] == "ext_proc"


@pytest.mark.parametrize("route", ["held", "watched"])
async def test_client_leaving_mid_stream_is_charged_an_estimate_of_what_was_streamed(
    stack: Stack, uid: str, route: str
) -> None:
    check_estimate = 500 + 3  # max_tokens plus ceil(8 / 4 * 1.2) prompt tokens: what Check reserved
    # A stream that did not ask for its usage is held (quotagate asks for it); one that did is only watched.
    include_usage = True if route == "watched" else None
    before = await streams(stack)
    request = stack.http.build_request(
        "POST",
        "/v1/chat/completions",
        json=body("a" * 8, stream=True, include_usage=include_usage),
        headers=headers(uid, **{"x-demo-completion-tokens": "400", "x-demo-chunk-delay-ms": "20"}),
    )
    response = await stack.http.send(request, stream=True)
    received = 0
    async for chunk in response.aiter_bytes():
        received += chunk.count(b"data: ")
        if received >= 5:
            break
    await response.aclose()  # the user closed the tab
    account = await settled(stack, uid)
    assert 0 < account.balance.allowance_used < check_estimate
    [event] = await usage_events(stack, uid)
    assert event["estimated"] is True
    assert event["cost"] == account.balance.allowance_used
    watched, held = await streams(stack)
    assert (watched - before[0], held - before[1]) == ((1, 0) if route == "watched" else (0, 1))


async def test_upstream_error_releases_the_reservation_and_charges_nothing(stack: Stack, uid: str) -> None:
    response = await stack.http.post(
        "/v1/chat/completions", json=body(), headers=headers(uid, **{"x-demo-status": "500"})
    )
    assert response.status_code == 500
    account = await settled(stack, uid, charged=False)
    assert (account.balance.reserved, account.balance.allowance_used) == (0, 0)
    [event] = await usage_events(stack, uid)
    assert (event["status"], event["cost"]) == ("failed", 0)


async def test_ext_proc_and_a_usage_report_for_the_same_request_charge_once(stack: Stack, uid: str) -> None:
    response = await stack.http.post(
        "/v1/chat/completions", json=body("b" * 40), headers=headers(uid, **{"x-demo-completion-tokens": "3"})
    )
    account = await settled(stack, uid)
    assert account.balance.allowance_used == 13
    reply = await stack.report(uid, response.headers["x-request-id"], 10, 3)  # e.g. the LiteLLM callback
    assert not reply.charged
    assert (await stack.account(uid)).balance.allowance_used == 13


async def test_denied_requests_are_not_charged_by_ext_proc(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(
        database_url, redis_url, redis_prefix, plans=[{"id": "ext-proc-10", "monthly_allowance": 10}]
    )
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        first = await stack.http.post(
            "/v1/chat/completions", json=body(), headers=headers(uid, **{"x-demo-completion-tokens": "30"})
        )
        assert first.status_code == 200
        await settled(stack, uid)
        denied = await stack.http.post("/v1/chat/completions", json=body(), headers=headers(uid))
        assert denied.status_code == 429
        assert denied.json()["error"]["code"] == "quota_exceeded"  # ext_proc left Envoy's own reply alone
        await asyncio.sleep(0.2)
        assert len(await usage_events(stack, uid)) == 1


async def test_streams_keep_their_pace(stack: Stack, uid: str) -> None:
    # 20 chunks 50 ms apart: if the stream were buffered, nothing would arrive before the end (~1 s).
    request = stack.http.build_request(
        "POST",
        "/v1/chat/completions",
        json=body(stream=True),
        headers=headers(uid, **{"x-demo-completion-tokens": "20", "x-demo-chunk-delay-ms": "50"}),
    )
    started = time.monotonic()
    response = await stack.http.send(request, stream=True)
    arrivals: list[float] = []
    async for chunk in response.aiter_bytes():
        arrivals.extend([time.monotonic() - started] * chunk.count(b"data: "))
    await response.aclose()
    assert len(arrivals) >= 20
    assert arrivals[0] < 0.5 < arrivals[-1]
    assert (await settled(stack, uid)).balance.allowance_used > 0


async def test_plain_get_passes_untouched(stack: Stack, uid: str) -> None:
    response = await stack.http.get("/v1/models", headers=headers(uid))
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["demo-small", "demo-large"]
    await asyncio.sleep(0.2)
    assert await usage_events(stack, uid) == []


async def test_a_large_json_answer_is_read_as_a_stream_and_charged(stack: Stack, uid: str) -> None:
    # ~900 KB of JSON: more than quotagate lets Envoy buffer, so it is streamed through and read as it passes.
    response = await stack.http.post(
        "/v1/chat/completions", json=body("c" * 4), headers=headers(uid, **{"x-demo-completion-tokens": "150000"})
    )
    assert response.status_code == 200
    assert len(response.content) > 512 << 10
    assert response.json()["usage"]["completion_tokens"] == 150_000
    assert (await settled(stack, uid)).balance.allowance_used == 1 + 150_000


@contextlib.asynccontextmanager
async def ledger_held(database_url: str, user: str) -> AsyncIterator[None]:
    """Holds the account's row lock, as a slow ledger would: a settlement of this user waits until the end."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user)
            yield
    finally:
        await conn.close()


async def eventually_reserved(stack: Stack, user: str, reserved: int) -> admin_pb2.Account:
    deadline = time.monotonic() + 5
    while (account := await stack.account(user)).balance.reserved != reserved:
        assert time.monotonic() < deadline, f"reserved stays {account.balance.reserved}, not {reserved}"
        await asyncio.sleep(0.02)
    return account


async def test_far_from_every_threshold_the_answer_is_only_watched_and_never_waits(
    stack: Stack, uid: str, database_url: str
) -> None:
    assert (await stack.chat(uid, completion_tokens=5)).status_code == 200
    before = (await settled(stack, uid)).balance.allowance_used
    watched, held = await streams(stack)
    async with ledger_held(database_url, uid):
        # Costs 13 of a 100,000 allowance and less than its hold (max_tokens 40): Envoy answers without
        # waiting for quotagate at all (observability mode), and the charge follows.
        response = await asyncio.wait_for(stack.chat(uid, completion_tokens=10), timeout=5)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 10
        # Not in the ledger yet: its cost (not its hold of 40 and more) is shown as held meanwhile...
        account = await eventually_reserved(stack, uid, 13)
        assert account.balance.allowance_used == before
        # ...and the next request is decided on the charge.
        following = await asyncio.wait_for(stack.chat(uid, completion_tokens=10), timeout=5)
        assert int(following.headers["x-quota-remaining"]) == 100_000 - before - 13
    after = await settled(stack, uid)
    assert after.balance.allowance_used == before + 26
    # Both went to the watching filter, none to the one that holds answers.
    assert await streams(stack) == (watched + 2, held)


async def test_near_a_threshold_the_answer_waits_for_the_charge(stack: Stack, uid: str, database_url: str) -> None:
    # 80,003 of 100,000: warn.
    assert (await stack.chat(uid, completion_tokens=80_000)).status_code == 200
    before = (await settled(stack, uid)).balance.allowance_used
    watched, held = await streams(stack)
    async with ledger_held(database_url, uid):
        answer = asyncio.ensure_future(stack.chat(uid, completion_tokens=10))
        await asyncio.sleep(0.3)
        assert not answer.done(), "answered before the charge landed"
    response = await asyncio.wait_for(answer, timeout=5)
    assert response.status_code == 200
    account = await stack.account(uid)  # no waiting: the charge is there when the answer is
    assert (account.balance.allowance_used, account.balance.reserved) == (before + 3 + 10, 0)
    assert await streams(stack) == (watched, held + 1)
    assert SETTLE_FIRST_HEADER not in (await stack.upstream_requests())[-1]["headers"]  # routing only


async def test_a_watched_answer_costlier_than_its_hold_is_charged_in_full_just_after(
    stack: Stack, uid: str, database_url: str
) -> None:
    assert (await stack.chat(uid, completion_tokens=5)).status_code == 200
    before = (await settled(stack, uid)).balance.allowance_used
    async with ledger_held(database_url, uid):
        # max_tokens 40 holds about 44; the upstream answers with 400. Nobody waits for the charge, which goes
        # to the ledger first (the hold stays meanwhile, since the cost would not fit in it).
        response = await asyncio.wait_for(stack.chat(uid, completion_tokens=400), timeout=5)
        assert response.status_code == 200
        account = await stack.account(uid)
        assert account.balance.allowance_used == before and account.balance.reserved > 0
    after = await settled(stack, uid)
    assert after.balance.allowance_used == before + 3 + 400
