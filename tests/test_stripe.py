"""Buying credits with Stripe Checkout, end to end: real Envoy, PostgreSQL, Redis, and a local stand-in for
Stripe's API. Webhooks are signed in the test exactly as Stripe signs them."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from harness import ADMIN_TOKEN, CLIENT_KEY, Stack, make_settings
from stripe_standin import SECRET_KEY, StripeStandIn, event, sign

from quotagate.v1 import admin_pb2

PACKAGES = [
    {"id": "tokens_200k", "tokens": 200_000, "price": 5000, "currency": "BRL"},
    {"id": "tokens_500k", "tokens": 500_000, "price": 12000, "currency": "BRL"},
    {"id": "tokens_1m", "tokens": 1_000_000, "price": 23000, "currency": "BRL"},
    {"id": "old_promo", "tokens": 50_000, "price": 1000, "currency": "BRL", "active": False},
]
ADMIN_MD = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@pytest.fixture
async def standin() -> AsyncIterator[StripeStandIn]:
    server = await StripeStandIn().start()
    yield server
    await server.stop()


def stripe_settings(database_url: str, redis_url: str, prefix: str, standin: StripeStandIn, **extra: Any) -> Any:
    return make_settings(
        database_url,
        redis_url,
        prefix,
        link_secret="test-link-secret",
        public_url="https://chat.example.com",
        stripe=standin.settings(
            success_url="https://chat.example.com/paid", cancel_url="https://chat.example.com/cancelled"
        ),
        packages=PACKAGES,
        **extra,
    )


@pytest.fixture
async def stack(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, standin: StripeStandIn
) -> AsyncIterator[Stack]:
    settings = stripe_settings(database_url, redis_url, redis_prefix, standin)
    async with Stack(settings, tmp_path, ext_proc=True) as running:
        yield running


def client_headers(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user}


async def buy(stack: Stack, standin: StripeStandIn, user: str, package: str = "tokens_200k") -> str:
    """Follows the purchase link through Envoy as the chat client; returns the Checkout Session id."""
    response = await stack.http.get("/v1/quota/purchase", params={"package": package}, headers=client_headers(user))
    assert response.status_code == 303, response.text
    session_id = response.headers["location"].rsplit("/", 1)[1]
    assert session_id in standin.sessions
    return session_id


async def deliver(stack: Stack, payload: bytes, signature: str | None = None) -> httpx.Response:
    """Posts a webhook to quotagate's own HTTP port, as Stripe does (not through Envoy)."""
    headers = {"content-type": "application/json"}
    headers["stripe-signature"] = sign(payload) if signature is None else signature
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"http://127.0.0.1:{stack.http_port}/webhooks/stripe", content=payload, headers=headers
        )


async def grants_of(stack: Stack, user: str) -> list[dict[str, Any]]:
    assert stack.quotagate is not None
    pool = stack.quotagate.service.ledger.pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM credit_grants WHERE user_id = $1 ORDER BY id", user)
    return [dict(r) for r in rows]


async def payments(stack: Stack, **filters: Any) -> list[admin_pb2.Payment]:
    reply = await stack.admin.ListPayments(admin_pb2.ListPaymentsRequest(**filters), metadata=ADMIN_MD)
    return list(reply.payments)


async def test_purchase_link_with_client_headers_redirects_to_checkout(
    stack: Stack, standin: StripeStandIn, uid: str
) -> None:
    response = await stack.http.get(
        "/v1/quota/purchase", params={"package": "tokens_200k"}, headers=client_headers(uid)
    )
    assert response.status_code == 303
    [sent] = standin.requests
    form = sent["form"]
    assert response.headers["location"] == standin.sessions[next(iter(standin.sessions))]["url"]
    assert sent["authorization"] == f"Bearer {SECRET_KEY}"
    assert form["mode"] == "payment"
    assert form["line_items[0][price_data][unit_amount]"] == "5000"
    assert form["line_items[0][price_data][currency]"] == "brl"
    assert form["line_items[0][quantity]"] == "1"
    assert form["line_items[0][price_data][product_data][name]"] == "200k tokens"
    assert form["client_reference_id"] == uid
    assert (form["metadata[user_id]"], form["metadata[package_id]"], form["metadata[tokens]"]) == (
        uid,
        "tokens_200k",
        "200000",
    )
    assert form["payment_intent_data[metadata][user_id]"] == uid
    assert form["success_url"] == "https://chat.example.com/paid"
    assert form["cancel_url"] == "https://chat.example.com/cancelled"
    [open_payment] = await payments(stack, user_id=uid)
    assert open_payment.status == "open" and open_payment.amount == 5000 and open_payment.tokens == 200_000


async def test_signed_link_from_the_429_lists_packages_and_checks_out(
    stack: Stack, standin: StripeStandIn, uid: str
) -> None:
    assert (await stack.chat(uid, completion_tokens=1000, max_tokens=900)).status_code == 200
    blocked = await stack.chat(uid)
    assert blocked.status_code == 429
    link = urlsplit(blocked.json()["error"]["quota"]["purchase_url"])
    assert link.path == "/v1/quota/purchase"
    token = parse_qs(link.query)["t"][0]

    # A browser follows the link: no client key, only the signed t=.
    page = await stack.http.get(link.path, params={"t": token}, headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    hrefs = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', page.text)]
    assert [parse_qs(urlsplit(h).query)["package"][0] for h in hrefs] == ["tokens_200k", "tokens_500k", "tokens_1m"]
    assert all(parse_qs(urlsplit(h).query)["t"] == [token] for h in hrefs)
    assert "R$ 120.00" in page.text and "1M tokens" in page.text

    chosen = await stack.http.get(hrefs[1])
    assert chosen.status_code == 303
    form = standin.requests[-1]["form"]
    assert form["line_items[0][price_data][unit_amount]"] == "12000"
    assert form["line_items[0][price_data][currency]"] == "brl"
    assert form["metadata[user_id]"] == uid and form["metadata[tokens]"] == "500000"
    assert chosen.headers["location"].startswith("https://checkout.stripe.test/c/pay/cs_test_")

    # Where Stripe sends the buyer back when no success/cancel URL is configured: quotagate's own small pages.
    for path, words in (("/v1/quota/purchase/done", "Payment received"), ("/v1/quota/purchase/cancelled", "cancelled")):
        back = await stack.http.get(path)
        assert back.status_code == 200 and words in back.text, path


async def test_unknown_or_inactive_package_is_400(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    for package in ("tokens_9m", "old_promo"):
        response = await stack.http.get("/v1/quota/purchase", params={"package": package}, headers=client_headers(uid))
        assert response.status_code == 400, package
        assert response.json()["error"]["type"] == "invalid_package"
    assert standin.requests == []
    no_identity = await stack.http.get("/v1/quota/purchase", params={"package": "tokens_200k"})
    assert no_identity.status_code == 401


async def test_paid_webhook_unblocks_the_user_through_envoy(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    assert (await stack.chat(uid, completion_tokens=1000, max_tokens=900)).status_code == 200
    assert (await stack.chat(uid)).status_code == 429
    session_id = await buy(stack, standin, uid)

    response = await deliver(stack, event("checkout.session.completed", standin.pay(session_id)))
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "credited"

    allowed = await stack.chat(uid)
    assert allowed.status_code == 200, allowed.text
    account = await stack.account(uid)
    assert account.balance.credits > 199_000
    [grant] = await grants_of(stack, uid)
    assert (grant["source"], grant["source_ref"], grant["amount"]) == ("stripe", session_id, 200_000)
    assert "tokens_200k" in grant["reason"] and session_id in grant["reason"]
    [paid] = await payments(stack, session_id=session_id)
    assert paid.status == "paid" and paid.grant_id == grant["id"] and paid.payment_intent == f"pi_{session_id}"


async def test_the_same_event_five_times_at_once_credits_once(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    session_id = await buy(stack, standin, uid, "tokens_1m")
    payload = event("checkout.session.completed", standin.pay(session_id))
    responses = await asyncio.gather(*(deliver(stack, payload) for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert sorted(r.json()["result"] for r in responses).count("credited") == 1

    grants = await grants_of(stack, uid)
    assert [g["amount"] for g in grants] == [1_000_000]
    assert (await stack.account(uid)).balance.credits == 1_000_000
    assert stack.quotagate is not None
    audit = await stack.quotagate.service.ledger.audit_entries(uid)  # type: ignore[attr-defined]
    assert [a["actor"] for a in audit if a["action"] == "credits.grant"] == ["stripe"]
    # A later redelivery, one more time: still once.
    again = await deliver(stack, payload)
    assert again.status_code == 200 and again.json()["result"] == "no grant: paid"
    assert len(await grants_of(stack, uid)) == 1


async def test_bad_signatures_get_400_and_change_nothing(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    session_id = await buy(stack, standin, uid)
    payload = event("checkout.session.completed", standin.pay(session_id))
    tampered = payload.replace(b'"200000"', b'"900000"')
    assert tampered != payload
    old = int(time.time()) - 3600
    cases = {
        "tampered body": (tampered, sign(payload)),
        "wrong secret": (payload, sign(payload, secret="whsec_someone_else")),
        "old timestamp": (payload, sign(payload, timestamp=old)),
        "no signature": (payload, ""),
        "garbage header": (payload, "t=abc,v1=zzz"),
    }
    for name, (body, signature) in cases.items():
        response = await deliver(stack, body, signature)
        assert response.status_code == 400, name
        assert response.json()["error"]["type"] == "bad_signature"
    assert await grants_of(stack, uid) == []
    [still_open] = await payments(stack, session_id=session_id)
    assert still_open.status == "open" and still_open.grant_id == 0
    assert (await stack.account(uid)).balance.credits == 0


async def test_unknown_event_types_are_acknowledged_and_ignored(stack: Stack, uid: str) -> None:
    response = await deliver(stack, event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert response.status_code == 200 and response.json()["result"] == "ignored customer.created"
    foreign = {"id": "cs_foreign", "object": "checkout.session", "payment_status": "paid", "metadata": {}}
    response = await deliver(stack, event("checkout.session.completed", foreign))
    assert response.status_code == 200 and "ignored" in response.json()["result"]
    assert await payments(stack, session_id="cs_foreign") == []


async def test_refunds_take_back_the_unspent_part(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    session_id = await buy(stack, standin, uid)
    await deliver(stack, event("checkout.session.completed", standin.pay(session_id)))
    charge = {"id": f"ch_{uid}", "object": "charge", "payment_intent": f"pi_{session_id}", "amount": 5000}

    # Half refunded: half the tokens go.
    half = event("charge.refunded", {**charge, "amount_refunded": 2500, "refunded": False}, "evt_half")
    for _ in range(2):  # a redelivery removes nothing more
        response = await deliver(stack, half)
        assert response.status_code == 200, response.text
    assert (await stack.account(uid)).balance.credits == 100_000
    [partial] = await payments(stack, session_id=session_id)
    assert partial.status == "partially_refunded" and partial.tokens_removed == 100_000

    # Spend 1,000 allowance and 30,000 credits, then the rest is refunded: only the unspent 70,000 can go.
    await stack.report(uid, f"{uid}-spend", 31_000)
    assert (await stack.account(uid)).balance.credits == 70_000
    full = event("charge.refunded", {**charge, "amount_refunded": 5000, "refunded": True}, "evt_full")
    assert (await deliver(stack, full)).json()["result"] == "refund: 70000 tokens removed"
    balance = (await stack.account(uid)).balance
    assert balance.credits == 0 and balance.state == "blocked"
    assert (await stack.chat(uid)).status_code == 429
    [refunded] = await payments(stack, status="refunded", user_id=uid)
    assert refunded.refunded_amount == 5000 and refunded.tokens_removed == 170_000

    assert stack.quotagate is not None
    audit = await stack.quotagate.service.ledger.audit_entries(uid)  # type: ignore[attr-defined]
    adjusts = [a for a in audit if a["action"] == "credits.adjust"]
    assert [a["actor"] for a in adjusts] == ["stripe", "stripe"]
    assert all(session_id in a["reason"] for a in adjusts)
    ledger = await stack.admin.ListLedger(admin_pb2.ListLedgerRequest(user_id=uid), metadata=ADMIN_MD)
    removals = [e.amount for e in ledger.entries if e.kind == "adjustment"]
    assert sorted(removals) == [-100_000, -70_000]
    assert all(e.actor == "stripe" for e in ledger.entries if e.kind == "adjustment")


async def test_a_refund_of_an_unknown_charge_is_ignored(stack: Stack, uid: str) -> None:
    charge = {"id": "ch_x", "object": "charge", "payment_intent": "pi_unknown", "amount": 100, "amount_refunded": 100}
    response = await deliver(stack, event("charge.refunded", charge))
    assert response.status_code == 200 and "ignored" in response.json()["result"]


async def test_reconcile_by_session_id_credits_once(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    session_id = await buy(stack, standin, uid)
    request = admin_pb2.ReconcilePaymentRequest(session_id=session_id)
    unpaid = await stack.admin.ReconcilePayment(request, metadata=ADMIN_MD)
    assert not unpaid.granted and unpaid.payment_status == "unpaid" and unpaid.payment.status == "open"

    standin.pay(session_id)
    first, second = await asyncio.gather(*(stack.admin.ReconcilePayment(request, metadata=ADMIN_MD) for _ in (1, 2)))
    assert sorted([first.granted, second.granted]) == [False, True]
    assert first.payment.status == second.payment.status == "paid"
    # The webhook arriving late does not credit a second time.
    late = await deliver(stack, event("checkout.session.completed", standin.sessions[session_id]))
    assert late.json()["result"] == "no grant: paid"
    assert [g["amount"] for g in await grants_of(stack, uid)] == [200_000]

    missing = admin_pb2.ReconcilePaymentRequest(session_id="cs_test_nope")
    with pytest.raises(Exception, match=r"no checkout session"):
        await stack.admin.ReconcilePayment(missing, metadata=ADMIN_MD)


async def test_an_abandoned_session_expires_without_a_grant(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    session_id = await buy(stack, standin, uid)
    expired = {**standin.sessions[session_id], "status": "expired"}
    response = await deliver(stack, event("checkout.session.expired", expired))
    assert response.status_code == 200 and response.json()["result"] == "no grant: expired"
    [payment] = await payments(stack, user_id=uid, status="expired")
    assert payment.session_id == session_id and payment.grant_id == 0
    assert await grants_of(stack, uid) == []


async def test_payments_are_listed_in_pages_newest_first(stack: Stack, standin: StripeStandIn, uid: str) -> None:
    sessions = [await buy(stack, standin, uid, package) for package in ("tokens_200k", "tokens_500k", "tokens_1m")]
    first = await stack.admin.ListPayments(admin_pb2.ListPaymentsRequest(user_id=uid, page_size=2), metadata=ADMIN_MD)
    assert [p.session_id for p in first.payments] == sessions[:0:-1] and first.next_page_token
    rest = await stack.admin.ListPayments(
        admin_pb2.ListPaymentsRequest(user_id=uid, page_size=2, page_token=first.next_page_token), metadata=ADMIN_MD
    )
    assert [p.session_id for p in rest.payments] == sessions[:1] and rest.next_page_token == ""
    assert [p.amount for p in [*first.payments, *rest.payments]] == [23000, 12000, 5000]
    with pytest.raises(Exception, match="status must be one of"):
        await stack.admin.ListPayments(admin_pb2.ListPaymentsRequest(status="lost"), metadata=ADMIN_MD)
    # A time that is no time (hypothesis found this one: it was an INTERNAL error).
    broken = admin_pb2.ListPaymentsRequest(user_id=uid)
    broken.start.nanos = -1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.admin.ListPayments(broken, metadata=ADMIN_MD)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start is not a valid time" in str(refused.value.details())


async def test_with_stripe_on_a_manual_grant_still_unblocks(stack: Stack, uid: str) -> None:
    """The manual path (an admin grant after an e-mail) stays as the fallback while Stripe is on."""
    assert (await stack.chat(uid, completion_tokens=1000, max_tokens=900)).status_code == 200
    blocked = await stack.chat(uid)
    assert blocked.status_code == 429
    assert "/v1/quota/purchase?t=" in blocked.json()["error"]["quota"]["purchase_url"]
    await stack.grant(uid, 5000, "Paid by bank transfer, ticket 42.")
    assert (await stack.chat(uid)).status_code == 200
    [grant] = await grants_of(stack, uid)
    assert grant["source"] != "stripe" and grant["amount"] == 5000
    assert await payments(stack, user_id=uid) == []
