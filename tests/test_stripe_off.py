"""Stripe switched off (the default): the purchase path says so and names the manual path, the webhook takes
nothing without its secret, and the manual process (an operator's grant) unblocks as before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from harness import CLIENT_KEY, Stack, make_settings
from stripe_standin import event, sign


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        packages=[{"id": "tokens_200k", "tokens": 200_000, "price": 5000}],
    )
    async with Stack(settings, tmp_path) as running:
        yield running


async def test_the_purchase_path_names_the_manual_path(stack: Stack, uid: str) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid}
    api = await stack.http.get("/v1/quota/purchase", params={"package": "tokens_200k"}, headers=headers)
    assert api.status_code == 404
    assert api.json()["error"]["type"] == "stripe_disabled"
    assert "mailto:creditos@example.com" in api.json()["error"]["message"]

    browser = await stack.http.get("/v1/quota/purchase", headers={"accept": "text/html"})
    assert browser.status_code == 404 and browser.headers["content-type"].startswith("text/html")
    assert "mailto:creditos@example.com" in browser.text


async def test_the_manual_process_works_unchanged(stack: Stack, uid: str) -> None:
    assert (await stack.chat(uid, max_tokens=900)).status_code == 200
    await stack.report(uid, f"{uid}-all", 1000)
    blocked = await stack.chat(uid)
    assert blocked.status_code == 429
    assert blocked.json()["error"]["quota"]["purchase_url"] == "mailto:creditos@example.com"
    await stack.grant(uid, 5000, "Paid by bank transfer, ticket 42.")
    assert (await stack.chat(uid)).status_code == 200


async def test_the_webhook_without_a_secret_takes_nothing(stack: Stack, uid: str) -> None:
    session = {
        "id": f"cs_{uid}",
        "object": "checkout.session",
        "payment_status": "paid",
        "metadata": {"user_id": uid, "package_id": "tokens_200k", "tokens": "200000"},
    }
    payload = event("checkout.session.completed", session)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"http://127.0.0.1:{stack.http_port}/webhooks/stripe",
            content=payload,
            headers={"stripe-signature": sign(payload)},
        )
    assert response.status_code == 400
    assert "not configured" in response.json()["error"]["message"]
    # Not even routed through Envoy: the webhook is on quotagate's own port only, and Envoy answers every path it
    # does not meter with its own 404.
    through_envoy = await stack.http.post("/webhooks/stripe", content=payload, headers={"stripe-signature": "x"})
    assert through_envoy.status_code == 404
    assert through_envoy.json()["error"]["code"] == "unknown_url"
