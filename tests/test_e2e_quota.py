"""Through a real Envoy, real PostgreSQL and Redis: the quota states a user goes through, and the denials."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import ADMIN_TOKEN, CLIENT_KEY, PERSONAL_KEY, Stack, make_settings

from quotagate.v1 import admin_pb2


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(make_settings(database_url, redis_url, redis_prefix), tmp_path) as running:
        yield running


async def test_user_goes_normal_warn_critical_blocked_and_a_grant_unblocks(stack: Stack, uid: str) -> None:
    # allowance 1000 on the test plan; each step reports usage for the request Envoy let through.
    steps = [(700, "normal"), (100, "normal"), (150, "warn"), (50, "critical")]
    for tokens, expected_state in steps:
        response = await stack.chat(uid)
        assert response.status_code == 200, response.text
        assert response.headers["x-quota-state"] == expected_state
        assert response.headers["x-quota-limit"] == "1000"
        if expected_state in ("warn", "critical"):
            assert response.headers["x-token-warning"] == "true"
        else:
            assert "x-token-warning" not in response.headers
        request_id = response.headers["x-request-id"]
        reply = await stack.report(uid, request_id, tokens)
        assert reply.charged and reply.cost == tokens

    account = await stack.account(uid)
    assert account.balance.allowance_used == 1000
    assert account.balance.reserved == 0
    assert account.balance.state == "blocked"

    blocked = await stack.chat(uid)
    assert blocked.status_code == 429
    assert blocked.headers["content-type"] == "application/json"
    assert blocked.headers["x-quota-state"] == "blocked"
    assert blocked.headers["x-quota-remaining"] == "0"
    assert int(blocked.headers["retry-after"]) > 0
    error = blocked.json()["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "quota_exceeded"
    assert "\n" not in error["message"] and len(error["message"]) <= 240
    assert error["quota"]["state"] == "blocked"
    assert error["quota"]["limit"] == 1000 and error["quota"]["used"] == 1000
    assert error["quota"]["purchase_url"] == "mailto:creditos@example.com"
    assert error["quota"]["reset_at"] == blocked.headers["x-quota-reset"]

    granted = await stack.grant(uid, 300)
    assert granted.balance.credits == 300
    assert granted.balance.state == "critical"  # allowance used up, but credits left: never blocked

    after = await stack.chat(uid)
    assert after.status_code == 200
    assert after.headers["x-quota-state"] == "critical"
    assert after.headers["x-quota-remaining"] == "300"
    await stack.report(uid, after.headers["x-request-id"], 120)
    account = await stack.account(uid)
    assert account.balance.credits == 180  # the allowance is spent, so the charge drew the credits


async def test_suspended_account_gets_403_until_activated(stack: Stack, uid: str) -> None:
    assert (await stack.chat(uid)).status_code == 200
    auth = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    await stack.admin.SuspendAccount(
        admin_pb2.SetAccountStatusRequest(user_id=uid, reason="Card payment disputed by the bank."), metadata=auth
    )
    denied = await stack.chat(uid)
    assert denied.status_code == 403
    error = denied.json()["error"]
    assert (error["type"], error["code"]) == ("permission_denied", "account_suspended")
    await stack.admin.ActivateAccount(
        admin_pb2.SetAccountStatusRequest(user_id=uid, reason="The dispute was resolved."), metadata=auth
    )
    assert (await stack.chat(uid)).status_code == 200


@pytest.mark.parametrize(
    ("key", "user"),
    [(None, "someone"), ("not-a-known-key", "someone"), (CLIENT_KEY, None)],
    ids=["missing key", "wrong key", "trusted key without x-user-id"],
)
async def test_missing_or_bad_key_gets_401(stack: Stack, key: str | None, user: str | None) -> None:
    response = await stack.chat(user, key=key)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert await stack.upstream_requests() == []  # nothing reached the LLM


async def test_untrusted_key_cannot_assert_another_user(stack: Stack) -> None:
    response = await stack.chat("victim", key=PERSONAL_KEY)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    own = await stack.chat(None, key=PERSONAL_KEY)
    assert own.status_code == 200
    seen = await stack.upstream_requests()
    assert [r["headers"]["x-quota-user"] for r in seen] == ["personal-user"]


async def test_spoofed_quota_user_header_is_overwritten(stack: Stack, uid: str) -> None:
    response = await stack.chat(uid, extra_headers={"x-quota-user": "somebody-else"})
    assert response.status_code == 200
    seen = await stack.upstream_requests()
    assert seen[-1]["headers"]["x-quota-user"] == uid


async def test_malformed_body_gets_400_and_reserves_nothing(stack: Stack, uid: str) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid, "content-type": "application/json"}
    response = await stack.http.post(
        "/v1/chat/completions", content=b'{"model": "demo-small", "messages": [', headers=headers
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    absurd = await stack.http.post(
        "/v1/chat/completions",
        content=json.dumps({"model": "demo-small", "max_tokens": -5, "messages": []}),
        headers=headers,
    )
    assert absurd.status_code == 400
    assert "max_tokens" in absurd.json()["error"]["message"]
    assert await stack.upstream_requests() == []


async def test_quotagate_down_gives_503(stack: Stack, uid: str) -> None:
    assert (await stack.chat(uid)).status_code == 200
    await stack.stop_quotagate()
    response = await stack.chat(uid)
    assert response.status_code == 503
    assert len(await stack.upstream_requests()) == 1  # fail-closed: the second request never reached the LLM


async def test_upstream_gets_its_own_key_never_the_clients(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix, upstream={"api_key": "litellm-master-key"})
    async with Stack(settings, tmp_path) as stack:
        assert (await stack.chat(uid)).status_code == 200
        seen = (await stack.upstream_requests())[-1]["headers"]
        assert seen["authorization"] == "Bearer litellm-master-key"
        assert CLIENT_KEY not in json.dumps(seen)
        assert seen["x-quota-user"] == uid


async def test_messages_in_portuguese(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix, language="pt-BR")
    async with Stack(settings, tmp_path) as stack:
        response = await stack.chat("alguem", key="chave-errada")
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "Chave de API ausente ou inválida."


async def test_unknown_user_is_created_with_the_default_plan_and_their_details(stack: Stack, uid: str) -> None:
    extra = {"x-user-email": "maria@example.com", "x-user-name": "Maria Silva"}
    assert (await stack.chat(uid, extra_headers=extra)).status_code == 200
    account = await stack.account(uid)
    assert (account.email, account.name, account.plan, account.status) == (
        "maria@example.com",
        "Maria Silva",
        "small",
        "active",
    )


async def test_header_names_are_matched_whatever_their_case(stack: Stack, uid: str) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "X-User-Id": uid, "Content-Type": "application/json"}
    body = {"model": "demo-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    response = await stack.http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert (await stack.account(uid)).user_id == uid


async def test_client_key_never_reaches_the_upstream_without_an_upstream_key(stack: Stack, uid: str) -> None:
    assert (await stack.chat(uid)).status_code == 200
    seen = (await stack.upstream_requests())[-1]["headers"]
    assert "authorization" not in seen


async def test_an_allowance_set_by_an_admin_applies_to_the_next_request(stack: Stack, uid: str) -> None:
    assert (await stack.chat(uid)).headers["x-quota-limit"] == "1000"
    auth = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    request = admin_pb2.UpsertAccountRequest(
        user_id=uid, allowance_override=250_000, reason="Enterprise trial for one month."
    )
    account = await stack.admin.UpsertAccount(request, metadata=auth)
    assert account.has_allowance_override and account.allowance_override == 250_000
    assert (await stack.chat(uid)).headers["x-quota-limit"] == "250000"
