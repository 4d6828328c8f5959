"""Through a real Envoy: /v1/quota reaches quotagate's HTTP port, and only the caller's own balance is shown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from harness import CLIENT_KEY, PERSONAL_KEY, Stack, make_settings

from quotagate.core.messages import Language, format_reset
from quotagate.links import LinkSigner


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = make_settings(database_url, redis_url, redis_prefix, link_secret="test-link-secret")
    async with Stack(settings, tmp_path, ext_proc=True, rate_limit=True) as running:
        yield running


async def test_balance_with_the_chat_credentials(stack: Stack, uid: str) -> None:
    # ext_proc charges what the demo upstream reports: the prompt plus 840 completion tokens.
    response = await stack.chat(uid, completion_tokens=840, max_tokens=900)
    assert response.status_code == 200

    page = await stack.http.get("/v1/quota", headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid})
    assert page.status_code == 200, page.text
    body = page.json()
    account = await stack.account(uid)
    assert body["user_id"] == uid
    assert body["allowance"] == 1000 and body["used"] == account.balance.allowance_used > 840
    assert body["remaining"] == 1000 - body["used"]
    assert body["state"] == "warn"
    assert body["purchase_url"] == "mailto:creditos@example.com"


async def test_a_blocked_user_still_reads_the_balance(stack: Stack, uid: str) -> None:
    response = await stack.chat(uid, completion_tokens=1000, max_tokens=900)
    assert response.status_code == 200
    assert (await stack.chat(uid)).status_code == 429
    page = await stack.http.get("/v1/quota", headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid})
    assert page.status_code == 200
    assert page.json()["state"] == "blocked" and page.json()["remaining"] == 0


async def test_first_sight_creates_the_account_like_a_chat_request(stack: Stack, uid: str) -> None:
    page = await stack.http.get("/v1/quota", headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid})
    assert page.status_code == 200
    assert page.json()["used"] == 0 and page.json()["state"] == "normal"
    assert (await stack.account(uid)).user_id == uid


async def test_identity_comes_only_from_the_key_or_a_signed_link(stack: Stack, uid: str) -> None:
    await stack.chat(uid)
    no_key = await stack.http.get("/v1/quota", headers={"x-user-id": uid})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    # An untrusted personal key cannot name somebody else.
    other = await stack.http.get("/v1/quota", headers={"authorization": f"Bearer {PERSONAL_KEY}", "x-user-id": uid})
    assert other.status_code == 401
    own = await stack.http.get("/v1/quota", headers={"authorization": f"Bearer {PERSONAL_KEY}"})
    assert own.status_code == 200 and own.json()["user_id"] == "personal-user"


async def test_signed_links(stack: Stack, uid: str) -> None:
    await stack.chat(uid)
    now = datetime.now(UTC)
    good = LinkSigner(b"test-link-secret", "http://unused").token(uid, now)
    page = await stack.http.get("/v1/quota", params={"t": good})
    assert page.status_code == 200 and page.json()["user_id"] == uid

    forged = LinkSigner(b"another-secret", "http://unused").token(uid, now)
    # Two hours back: expiries are rounded up to the hour, so one hour back could still be valid.
    expired = LinkSigner(b"test-link-secret", "http://unused", ttl_seconds=60).token(uid, now - timedelta(hours=2))
    for token in (forged, expired, good[:-2] + "xx", "garbage"):
        refused = await stack.http.get("/v1/quota", params={"t": token})
        assert refused.status_code == 401, token
        assert "link" in refused.json()["error"]["message"]

    unknown = LinkSigner(b"test-link-secret", "http://unused").token(uid + "-nobody", now)
    assert (await stack.http.get("/v1/quota", params={"t": unknown})).status_code == 404


async def test_purchase_links_follow_the_stripe_switch(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    """With Stripe on, the warn header and the 429 point at the user's own purchase page; off, at the
    credits address."""
    for stripe_on in (False, True):
        settings = make_settings(
            database_url,
            redis_url,
            redis_prefix,
            link_secret="test-link-secret",
            public_url="https://chat.example.com",
            stripe={"enabled": stripe_on},
        )
        user = f"{uid}-{stripe_on}"
        async with Stack(settings, tmp_path / str(stripe_on), ext_proc=True) as stack:
            warn = await stack.chat(user, completion_tokens=850, max_tokens=900)
            assert warn.status_code == 200
            warned = await stack.chat(user, completion_tokens=200, max_tokens=20)
            assert warned.headers["x-quota-state"] in ("warn", "critical")
            blocked = await stack.chat(user)
            assert blocked.status_code == 429
            url = blocked.json()["error"]["quota"]["purchase_url"]
            if not stripe_on:
                assert warned.headers["x-quota-purchase-url"] == "mailto:creditos@example.com"
                assert url == "mailto:creditos@example.com"
                continue
            assert warned.headers["x-quota-purchase-url"] == url
            assert url.startswith("https://chat.example.com/v1/quota/purchase?t=")
            token = url.split("t=", 1)[1]
            assert LinkSigner(b"test-link-secret", "").verify(token, datetime.now(UTC)) == user


async def test_the_blocked_line_names_the_reset_and_a_whole_link(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    """Stripe on: the 429's error.message carries the purchase link for an ordinary id; for a very long id
    the link would not fit in 240 characters, so it names the balance link in the notice instead, never a
    cut link."""
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        link_secret="test-link-secret",
        public_url="https://chat.example.com",
        stripe={"enabled": True},
    )
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        for user in (uid, uid + "-" + "x" * 230):
            assert (await stack.chat(user, completion_tokens=1000, max_tokens=900)).status_code == 200
            blocked = await stack.chat(user)
            assert blocked.status_code == 429
            error = blocked.json()["error"]
            text = error["message"]
            assert len(text) <= 240 and "\n" not in text
            _, balance = await stack.quotagate.service.account(user)  # type: ignore[union-attr]
            assert format_reset(balance.resets_at, settings.timezone, Language.EN) in text
            if user == uid:
                assert error["quota"]["purchase_url"] in text
            else:
                assert "https://" not in text and "balance link" in text
