"""`quotagate admin payments` as an operator runs it: list and search payments, reconcile a session whose
webhook never came (against the local stand-in for Stripe's API), crediting once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from harness import CLIENT_KEY, make_settings
from stripe_standin import StripeStandIn
from test_admin_cli import admin

from quotagate.config import AdminToken, sha256_hex
from quotagate.server import Running, start

VIEWER_TOKEN = "test-viewer-token"


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[Running, StripeStandIn]]:
    standin = await StripeStandIn().start()
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        stripe=standin.settings(),
        packages=[{"id": "tokens_500k", "tokens": 500_000, "price": 12000}],
        admin_tokens=[{"name": "viewer", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"}],
    )
    assert AdminToken("viewer", sha256_hex(VIEWER_TOKEN), "viewer") in settings.admin_tokens
    running = await start(settings)
    yield running, standin
    await running.stop()
    await standin.stop()


async def checkout(running: Running, user: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(
            f"http://127.0.0.1:{running.http_port}/v1/quota/purchase",
            params={"package": "tokens_500k"},
            headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user},
        )
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("/", 1)[1]


async def test_reconcile_from_the_cli_credits_once(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    session_id = await checkout(running, uid)

    code, out, _ = await admin(running, "payments", "reconcile", session_id)
    assert code == 0, out
    assert "payment unpaid" in out and "nothing granted" in out

    standin.pay(session_id)
    code, out, _ = await admin(running, "payments", "reconcile", session_id)
    assert code == 0
    assert "credited now" in out and "500,000 (tokens_500k)" in out
    code, out, _ = await admin(running, "payments", "reconcile", session_id)
    assert code == 0 and "credited before" in out
    _, balance = await running.service.account(uid)
    assert balance.credits == 500_000

    code, out, _ = await admin(running, "payments", "list", "--user", uid)
    assert code == 0
    assert session_id in out and "120.00 BRL" in out and "paid" in out
    code, out, _ = await admin(running, "--json", "payments", "list", "--status", "paid", "--session", session_id)
    [payment] = json.loads(out)["payments"]
    assert payment["user_id"] == uid and int(payment["grant_id"]) > 0
    code, out, _ = await admin(running, "--json", "payments", "list", "--user", uid, "--since", "2000-01-01T00:00Z")
    assert len(json.loads(out)["payments"]) == 1
    code, out, _ = await admin(running, "--json", "payments", "list", "--user", uid, "--until", "2000-01-01T00:00Z")
    assert json.loads(out).get("payments", []) == []

    code, _, err = await admin(running, "payments", "reconcile", "cs_test_unknown")
    assert code == 5 and "no checkout session" in err


async def test_roles_viewer_lists_operator_reconciles(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    standin.pay(session_id)
    code, out, _ = await admin(running, "payments", "list", "--user", uid, token=VIEWER_TOKEN)
    assert code == 0 and "open" in out
    code, _, err = await admin(running, "payments", "reconcile", session_id, token=VIEWER_TOKEN)
    assert code == 4 and "operator" in err
    _, balance = await running.service.account(uid)
    assert balance.credits == 0
