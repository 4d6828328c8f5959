"""Red team: the meter can not be walked around by the ids, headers and resets a client controls.

Every attack goes the way a client of Envoy would send it (chosen x-request-id, x-user-id and x-quota-* headers,
raw bytes, requests Envoy gives up on), or the way a hand-written Envoy config that keeps client ids would let it
reach Check; each then reads the balance and the ledger rows, not only the status codes. The module ends with
`quotagate reconcile`'s check: Redis and the ledger agree after all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from harness import CLIENT_KEY, ENVOY_AUTH, USAGE_AUTH, Stack, make_settings
from served import check_request

from quotagate.core.clock import FixedClock
from quotagate.procs import free_port, start_redis, wait_for_port
from quotagate.reconcile import reconcile
from quotagate.v1 import admin_pb2, usage_pb2

PLAN = {"id": "redteam-meter-1k", "monthly_allowance": 1000}


@pytest.fixture(scope="module")
async def stack(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"
    settings = make_settings(database_url, redis_url, prefix, plans=[PLAN])
    async with Stack(settings, tmp_path_factory.mktemp("meter"), ext_proc=True) as running:
        yield running


def new_user() -> str:
    return f"rt-{uuid.uuid4().hex[:10]}"


def chat_body(*, max_tokens: int = 20, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "demo-small",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}],
    }


def headers(user: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user, **extra}


async def events_of(stack: Stack, user: str) -> list[dict[str, Any]]:
    assert stack.quotagate is not None
    events: list[dict[str, Any]] = await stack.quotagate.service.ledger.usage_events(user)  # type: ignore[attr-defined]
    return events


async def settled(stack: Stack, user: str, rows: int, timeout: float = 10.0) -> admin_pb2.Account:  # noqa: ASYNC109
    """The account once `rows` ledger rows are there and nothing is held any more."""
    deadline = time.monotonic() + timeout
    while True:
        account = await stack.account(user)
        if account.balance.reserved == 0 and len(await events_of(stack, user)) >= rows:
            return account
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: {account.balance}, {await events_of(stack, user)}")
        await asyncio.sleep(0.05)


async def upstream_calls_for(stack: Stack, user: str) -> int:
    return sum(1 for r in await stack.upstream_requests() if r.get("headers", {}).get("x-quota-user") == user)


# -- 1. the client never chooses the id that keys a reservation or a ledger row ---------------------------------


async def test_ten_completions_sent_with_one_chosen_id_are_ten_requests_each_charged(stack: Stack) -> None:
    user = new_user()
    chosen = f"chosen-{user}"
    ids = []
    for _ in range(10):
        response = await stack.http.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers=headers(user, **{"x-request-id": chosen, "x-demo-completion-tokens": "5"}),
        )
        assert response.status_code == 200
        ids.append(response.headers["x-request-id"])
    assert chosen not in ids and len(set(ids)) == 10  # Envoy made an id of its own for each
    account = await settled(stack, user, rows=10)
    events = await events_of(stack, user)
    assert sorted(e["request_id"] for e in events) == sorted(ids)
    assert all(e["status"] == "succeeded" and e["cost"] > 0 for e in events)
    assert account.balance.allowance_used == sum(e["cost"] for e in events)


async def test_a_stranger_reusing_a_victims_in_flight_id_is_served_as_a_request_of_their_own(stack: Stack) -> None:
    victim, stranger = new_user(), new_user()
    slow = {"x-demo-completion-tokens": "6", "x-demo-chunk-delay-ms": "150"}
    async with stack.http.stream(
        "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=headers(victim, **slow)
    ) as streaming:
        victim_id = streaming.headers["x-request-id"]
        assert (await stack.account(victim)).balance.reserved > 0  # the victim's hold is in flight
        theirs = await stack.http.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers=headers(stranger, **{"x-request-id": victim_id, "x-demo-completion-tokens": "4"}),
        )
        assert theirs.status_code == 200 and theirs.headers["x-request-id"] != victim_id
        await streaming.aread()
    victim_account = await settled(stack, victim, rows=1)
    stranger_account = await settled(stack, stranger, rows=1)
    [victim_row] = await events_of(stack, victim)
    [stranger_row] = await events_of(stack, stranger)
    assert (victim_row["request_id"], victim_row["completion_tokens"]) == (victim_id, 6)
    assert (stranger_row["request_id"], stranger_row["completion_tokens"]) == (theirs.headers["x-request-id"], 4)
    assert victim_account.balance.allowance_used == victim_row["cost"]
    assert stranger_account.balance.allowance_used == stranger_row["cost"] > 0


async def test_a_blocked_user_reusing_their_own_in_flight_id_gets_429(stack: Stack) -> None:
    user = new_user()
    # One request whose hold (max_tokens past the allowance) leaves nothing: the user is blocked while it runs.
    slow = {"x-demo-completion-tokens": "6", "x-demo-chunk-delay-ms": "150"}
    async with stack.http.stream(
        "POST", "/v1/chat/completions", json=chat_body(max_tokens=2000, stream=True), headers=headers(user, **slow)
    ) as streaming:
        first_id = streaming.headers["x-request-id"]
        again = await stack.http.post(
            "/v1/chat/completions", json=chat_body(), headers=headers(user, **{"x-request-id": first_id})
        )
        assert again.status_code == 429
        assert again.json()["error"]["quota"]["state"] == "blocked"
        await streaming.aread()
    account = await settled(stack, user, rows=1)
    [row] = await events_of(stack, user)
    assert row["request_id"] == first_id and account.balance.allowance_used == row["cost"]
    assert await upstream_calls_for(stack, user) == 1  # the refused one never reached the upstream


async def test_a_check_reusing_an_in_flight_id_is_refused_even_where_envoy_keeps_client_ids(stack: Stack) -> None:
    """A hand-written Envoy config may keep the client's x-request-id: quotagate itself never lets a second request
    ride on a held id, nor settle someone else's hold."""
    victim, attacker = new_user(), new_user()
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.decision_port}") as channel:
        authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        first = await authz.Check(check_request(CLIENT_KEY, victim, shared), metadata=ENVOY_AUTH)
        assert first.status.code == code_pb2.OK
        held = (await stack.account(victim)).balance.reserved
        assert held > 0
        for user in (attacker, victim):
            reused = await authz.Check(check_request(CLIENT_KEY, user, shared), metadata=ENVOY_AUTH)
            assert reused.status.code == code_pb2.INVALID_ARGUMENT
            assert reused.denied_response.status.code == 400
            assert "already in use" in json.loads(reused.denied_response.body)["error"]["message"]
    assert (await stack.account(victim)).balance.reserved == held  # held once, not twice
    # The attacker can not settle the victim's hold for nothing either.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.usage.ReportUsage(
            usage_pb2.ReportUsageRequest(
                request_id=shared, user_id=attacker, model="demo-small", status=usage_pb2.ReportUsageRequest.FAILED
            ),
            metadata=USAGE_AUTH,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stack.account(victim)).balance.reserved == held
    assert await events_of(stack, attacker) == [] and await events_of(stack, victim) == []
    await stack.report(victim, shared, 5, 5)
    account = await settled(stack, victim, rows=1)
    assert (account.balance.allowance_used, account.balance.reserved) == (10, 0)


# -- 6. failing open on a store error still does Check's header work ----------------------------------------------


async def test_client_quota_headers_never_reach_the_upstream(stack: Stack) -> None:
    user, victim = new_user(), new_user()
    forged = {"x-quota-user": victim, "x-quota-anything": "1", "x-quota-settle-first": "1"}
    response = await stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers(user, **forged))
    assert response.status_code == 200
    [seen] = [
        r
        for r in await stack.upstream_requests()
        if r["headers"].get("x-request-id") == response.headers["x-request-id"]
    ]
    assert seen["headers"]["x-quota-user"] == user
    assert not {"x-quota-anything", "x-quota-settle-first", "authorization"} & set(seen["headers"])
    account = await settled(stack, user, rows=1)
    [row] = await events_of(stack, user)
    assert row["request_id"] == response.headers["x-request-id"]
    assert account.balance.allowance_used == row["cost"] > 0
    assert not await _exists(stack, victim)  # the forged x-quota-user named nobody quotagate charges


async def test_failing_open_with_redis_down_still_strips_the_client_key_and_quota_headers(
    database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """on_store_error: allow lets requests through while Redis is gone, but the upstream still gets the user
    from quotagate (so a usage callback charges the right account), never the client's key or x-quota-* headers."""
    port = free_port()
    redis_proc = start_redis(tmp_path / "redis", port)
    await wait_for_port("127.0.0.1", port, process=redis_proc)
    settings = make_settings(database_url, f"redis://127.0.0.1:{port}/0", redis_prefix, on_store_error="allow")
    user, victim = new_user(), new_user()
    try:
        async with Stack(settings, tmp_path, ext_proc=True) as stack:
            assert (await stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers(user))).is_success
            redis_proc.stop()
            forged = {"x-quota-user": victim, "x-quota-ask-usage": "1", "x-quota-anything": "1"}
            response = await stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers(user, **forged))
            assert response.status_code == 200  # failed open, as configured
            [seen] = [
                r
                for r in await stack.upstream_requests()
                if r["headers"].get("x-request-id") == response.headers["x-request-id"]
            ]
            assert seen["headers"]["x-quota-user"] == user
            assert not {"authorization", "x-quota-ask-usage", "x-quota-anything"} & set(seen["headers"])
            assert not await _exists(stack, victim)
            metrics = (await stack.http.get(f"http://127.0.0.1:{stack.http_port}/metrics")).text
            assert 'quotagate_store_errors_total{policy="allow"}' in metrics
    finally:
        redis_proc.stop()


async def _exists(stack: Stack, user: str) -> bool:
    try:
        await stack.account(user)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


# -- 7. identity headers: one value each, in UTF-8 ----------------------------------------------------------------


def raw_request(port: int, header_lines: bytes) -> tuple[int, bytes]:
    """An HTTP/1.1 request written by hand (httpx would refuse the bytes an attacker sends)."""
    body = json.dumps(chat_body()).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: quotagate\r\n"
        + f"authorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\n".encode()
        + header_lines
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


async def test_two_x_user_id_headers_are_refused_not_joined_into_a_third_account(stack: Stack) -> None:
    a, b = new_user(), new_user()
    status, body = await asyncio.to_thread(
        raw_request, stack.envoy_port, f"x-user-id: {a}\r\nx-user-id: {b}\r\n".encode()
    )
    assert status == 400 and b"x-user-id" in body
    for user in (a, b, f"{a},{b}"):
        assert not await _exists(stack, user)
    assert await upstream_calls_for(stack, a) == await upstream_calls_for(stack, f"{a},{b}") == 0


async def test_non_utf8_user_ids_are_refused_not_collapsed_into_one_account(stack: Stack) -> None:
    stem = new_user()
    for last in (b"\xe9", b"\xea"):
        status, body = await asyncio.to_thread(
            raw_request, stack.envoy_port, b"x-user-id: " + stem.encode() + last + b"\r\n"
        )
        assert status == 400 and b"UTF-8" in body
    # Envoy's headers map would have shown both as the same account, the bytes turned into "!".
    assert not await _exists(stack, stem + "!")


# -- 3. a hold whose request never reached the upstream is released, not charged -------------------------------


async def test_holds_of_checks_envoy_gave_up_on_are_released_when_they_expire(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Redis stalls past Envoy's Check timeout: Envoy answers 503 and the requests never reach the upstream, but
    each Check's reservation script runs once Redis is back. When those holds expire they are released, with a
    ledger row at 0 saying why, instead of being charged their estimates."""
    clock = FixedClock(datetime.now(UTC))
    settings = make_settings(database_url, redis_url, redis_prefix, reservation_ttl_seconds=60)
    user = new_user()
    options = {"authz_timeout_ms": 200}
    async with Stack(settings, tmp_path, clock=clock, ext_proc=True, envoy_options=options) as stack:
        service = stack.quotagate.service  # type: ignore[union-attr]
        first = await stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers(user))
        assert first.status_code == 200
        await settled(stack, user, rows=1)
        paused = aioredis.Redis.from_url(redis_url)
        try:
            await paused.execute_command("CLIENT", "PAUSE", "1000", "WRITE")  # scripts wait, reads go on
            replies = await asyncio.gather(
                *(stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers(user)) for _ in range(5))
            )
        finally:
            await paused.aclose()
        assert [r.status_code for r in replies] == [503] * 5  # Envoy gave up on every Check
        deadline = time.monotonic() + 10
        while len(await service.hot.due_reservations(clock.now().timestamp() + 61, -1)) < 5:
            assert time.monotonic() < deadline, "the stalled Checks never placed their holds"
            await asyncio.sleep(0.05)
        held = await stack.account(user)
        assert held.balance.reserved > 0  # until they expire, the holds count against the user
        clock.advance(61)
        assert await service.expire_due() == 0  # none charged
        account = await stack.account(user)
        events = await events_of(stack, user)
        released = [e for e in events if e["source"] == "unforwarded"]
        assert len(released) == 5
        assert all(e["cost"] == 0 and e["status"] == "failed" for e in released)
        [served] = [e for e in events if e["status"] == "succeeded"]
        assert served["request_id"] == first.headers["x-request-id"]
        assert (account.balance.allowance_used, account.balance.reserved) == (served["cost"], 0)
        assert await upstream_calls_for(stack, user) == 1
        metrics = (await stack.http.get(f"http://127.0.0.1:{stack.http_port}/metrics")).text
        assert "quotagate_reservations_released_total 5.0" in metrics


async def test_a_client_leaving_before_the_answer_is_charged_the_estimate_when_the_hold_expires(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The request reached the upstream, which writes the whole answer before its headers; the client resets
    first. What the upstream spent is unknown: the hold is charged its estimate when it expires, and the ledger
    says it was estimated (not a guess from the prompt alone, which would make such resets nearly free)."""
    clock = FixedClock(datetime.now(UTC))
    settings = make_settings(database_url, redis_url, redis_prefix, reservation_ttl_seconds=60)
    user = new_user()
    async with Stack(settings, tmp_path, clock=clock, ext_proc=True) as stack:
        service = stack.quotagate.service  # type: ignore[union-attr]
        slow = headers(user, **{"x-demo-answer-delay-ms": "3000"})
        request = asyncio.ensure_future(
            stack.http.post("/v1/chat/completions", json=chat_body(max_tokens=60), headers=slow)
        )
        deadline = time.monotonic() + 10
        while not (due := await service.hot.due_reservations(clock.now().timestamp() + 61, -1)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        [request_id] = due
        while not ((held := await service.hot.peek_reservation(request_id)) and held.forwarded):
            assert time.monotonic() < deadline, "ext_proc never saw the request go on"
            await asyncio.sleep(0.02)
        request.cancel()  # the client goes away before any answer
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.5)  # Envoy resets the ext_proc stream; nothing may settle the hold now
        assert await service.hot.peek_reservation(request_id) == held
        assert await events_of(stack, user) == []
        clock.advance(61)
        assert await service.expire_due() == 1
        [row] = await events_of(stack, user)
        assert (row["request_id"], row["source"], row["estimated"], row["cost"]) == (
            request_id,
            "expired",
            True,
            held.estimate,
        )
        account = await stack.account(user)
        assert (account.balance.allowance_used, account.balance.reserved) == (held.estimate, 0)


# -- 8. usage lands at once, the first completion after a start included -----------------------------------------


async def test_the_first_streamed_completion_after_a_start_is_in_the_ledger_within_a_second(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix)
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        for stream in (True, False, True):
            user = new_user()
            response = await stack.http.post(
                "/v1/chat/completions",
                json=chat_body(stream=stream),
                headers=headers(user, **{"x-demo-completion-tokens": "3"}),
            )
            ended = time.monotonic()
            assert response.status_code == 200
            while not await events_of(stack, user):
                assert time.monotonic() - ended < 1.0, "the settlement took more than a second"
                await asyncio.sleep(0.01)
            assert (await stack.account(user)).balance.allowance_used > 0


# -- after everything above ------------------------------------------------------------------------------------


async def test_zz_reconcile_finds_no_drift_after_the_attacks(stack: Stack) -> None:
    assert stack.quotagate is not None
    report = await reconcile(stack.quotagate.service, repair=False)
    assert report.checked > 0
    assert report.drift == []
