"""Forged-but-signed Stripe events, posted as Stripe posts them: to quotagate's own HTTP port, signed with the
webhook secret. The signature only says the body came from whoever holds the secret; what is credited, refunded
or mailed is decided by quotagate's own payment row, written when it created the checkout session. Each test
reads the ledger afterwards: grants, ledger entries, payment rows and the account's credits.

quotagate runs with real PostgreSQL and Redis and a local stand-in for Stripe's API; Envoy plays no part in a
webhook, so none is started."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from harness import ADMIN_TOKEN, CLIENT_KEY, make_settings
from stripe_standin import StripeStandIn, event, sign

from quotagate.server import Running, start
from quotagate.v1 import admin_pb2, admin_pb2_grpc

PACKAGE = {"id": "tokens_200k", "tokens": 200_000, "price": 5000, "currency": "BRL"}
HUGE = 10**30
ADMIN_MD = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[Running, StripeStandIn]]:
    standin = await StripeStandIn().start()
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        stripe=standin.settings(),
        packages=[PACKAGE, {"id": "tokens_1m", "tokens": 1_000_000, "price": 23000, "currency": "BRL"}],
    )
    running = await start(settings)
    yield running, standin
    await running.stop()
    await standin.stop()


async def checkout(running: Running, user: str, package: str = "tokens_200k") -> str:
    """The user opens the purchase link (the chat client's credentials); returns the Checkout Session id."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(
            f"http://127.0.0.1:{running.http_port}/v1/quota/purchase",
            params={"package": package},
            headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user},
        )
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("/", 1)[1]


async def post(running: Running, payload: bytes, signature: str | bytes | None = None) -> httpx.Response:
    header = sign(payload) if signature is None else signature
    headers = {
        b"content-type": b"application/json",
        b"stripe-signature": header.encode() if isinstance(header, str) else header,
    }
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"http://127.0.0.1:{running.http_port}/webhooks/stripe", content=payload, headers=headers
        )


def pool(running: Running) -> asyncpg.Pool:
    return running.service.ledger.pool  # type: ignore[attr-defined]


async def ledger_of(running: Running, user: str) -> dict[str, Any]:
    """Everything money-like PostgreSQL holds for this user."""
    async with pool(running).acquire() as conn:
        grants = await conn.fetch("SELECT amount, remaining, source_ref FROM credit_grants WHERE user_id = $1", user)
        entries = await conn.fetch(
            "SELECT kind, amount FROM ledger_entries WHERE user_id = $1 AND kind IN ('grant', 'adjustment')", user
        )
        rows = await conn.fetch(
            "SELECT session_id, status, grant_id, tokens, amount, payment_intent FROM payments WHERE user_id = $1",
            user,
        )
    return {
        "credits": sum(g["remaining"] for g in grants),
        "grants": [(g["amount"], g["source_ref"]) for g in grants],
        "entries": sorted((e["kind"], e["amount"]) for e in entries),
        "payments": [dict(r) for r in rows],
    }


async def assert_nothing_credited(running: Running, user: str, session_id: str, status: str = "open") -> None:
    book = await ledger_of(running, user)
    assert (book["credits"], book["grants"], book["entries"]) == (0, [], [])
    [row] = book["payments"]
    assert (row["session_id"], row["status"], row["grant_id"], row["tokens"]) == (session_id, status, None, 200_000)


def paid(standin: StripeStandIn, session_id: str, **changes: Any) -> dict[str, Any]:
    """The session as Stripe would send it once paid, with the forger's changes."""
    session = standin.pay(session_id)
    session.update(changes)
    return session


async def test_an_unknown_session_credits_nothing(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, _ = server
    forged = {
        "id": "cs_test_never_created_by_quotagate",
        "object": "checkout.session",
        "status": "complete",
        "payment_status": "paid",
        "payment_intent": "pi_forged",
        "amount_total": 1,
        "currency": "brl",
        "client_reference_id": uid,
        "metadata": {"user_id": uid, "package_id": "tokens_200k", "tokens": "5000000"},
    }
    for kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        response = await post(running, event(kind, forged))
        assert response.status_code == 200, response.text
        assert response.json()["result"] == "ignored: not a checkout session quotagate created"
    book = await ledger_of(running, uid)
    assert book == {"credits": 0, "grants": [], "entries": [], "payments": []}


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"amount_total": 1}, "amount_total is not the package's price"),
        ({"amount_total": 4999}, "amount_total is not the package's price"),
        ({"amount_total": HUGE}, "amount_total is not the package's price"),
        ({"amount_total": "5000"}, "amount_total is not the package's price"),  # a string is no amount
        ({"currency": "usd"}, "paid in 'usd'"),
        ({"currency": None}, "paid in ''"),
        ({"metadata": {"tokens": "5000000"}}, "metadata tokens differ from the 200000"),
        ({"metadata": {"tokens": str(HUGE)}}, "metadata tokens differ"),
        ({"metadata": {"tokens": HUGE}}, "metadata tokens differ"),  # a JSON number, not Stripe's text
        ({"metadata": {"tokens": "²"}}, "metadata tokens differ"),  # a digit to str.isdigit, not to int()
        ({"metadata": {"package_id": "tokens_1m"}}, "another package"),
    ],
)
async def test_a_paid_session_that_disagrees_with_quotagate_credits_nothing(
    server: tuple[Running, StripeStandIn], uid: str, changes: dict[str, Any], why: str
) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    session = paid(standin, session_id)
    metadata = {**session["metadata"], **changes.pop("metadata", {})}
    forged = {**session, **changes, "metadata": metadata}
    for _ in range(2):  # a redelivery is refused the same way, with a 200 so Stripe stops
        response = await post(running, event("checkout.session.completed", forged))
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert result.startswith("refused: ") and why in result, result
    await assert_nothing_credited(running, uid, session_id)


async def test_an_unpaid_session_credits_nothing(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    for payment_status in ("unpaid", "no_payment_required", "PAID", None):
        unpaid = {**paid(standin, session_id), "payment_status": payment_status}
        response = await post(running, event("checkout.session.completed", unpaid))
        assert response.status_code == 200 and response.json()["result"] == "no grant: unpaid", payment_status
    await assert_nothing_credited(running, uid, session_id, status="unpaid")


async def test_a_session_of_user_a_with_metadata_naming_user_b(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    other = f"{uid}-b"
    session_id = await checkout(running, uid)
    session = paid(standin, session_id)
    forgeries = [
        {**session, "metadata": {**session["metadata"], "user_id": other}},
        {**session, "client_reference_id": other},
        {**session, "client_reference_id": other, "metadata": {**session["metadata"], "user_id": other}},
    ]
    for forged in forgeries:
        response = await post(running, event("checkout.session.completed", forged))
        assert response.status_code == 200
        assert "names another user" in response.json()["result"]
    await assert_nothing_credited(running, uid, session_id)
    assert await ledger_of(running, other) == {"credits": 0, "grants": [], "entries": [], "payments": []}


async def test_the_same_event_replayed_credits_once(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    payload = event("checkout.session.completed", paid(standin, session_id))
    answers = await asyncio.gather(*(post(running, payload) for _ in range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert sorted(a.json()["result"] for a in answers) == ["credited"] + ["no grant: paid"] * 5
    # Later, and as the other "paid" event type, and re-signed with a fresh timestamp: still once.
    again = event("checkout.session.async_payment_succeeded", paid(standin, session_id), "evt_again")
    for body in (payload, again):
        response = await post(running, body)
        assert response.status_code == 200 and response.json()["result"] == "no grant: paid"
    book = await ledger_of(running, uid)
    assert book["grants"] == [(200_000, session_id)] and book["entries"] == [("grant", 200_000)]
    assert book["credits"] == 200_000
    _, balance = await running.service.account(uid)
    assert balance.credits == 200_000


async def test_a_legitimate_session_credits_exactly_the_package(
    server: tuple[Running, StripeStandIn], uid: str
) -> None:
    running, standin = server
    session_id = await checkout(running, uid, "tokens_1m")
    response = await post(running, event("checkout.session.completed", paid(standin, session_id)))
    assert response.status_code == 200 and response.json()["result"] == "credited"
    book = await ledger_of(running, uid)
    assert book["grants"] == [(1_000_000, session_id)] and book["entries"] == [("grant", 1_000_000)]
    [row] = book["payments"]
    assert (row["status"], row["tokens"], row["amount"], row["payment_intent"]) == (
        "paid", 1_000_000, 23000, f"pi_{session_id}"
    )  # fmt: skip
    _, balance = await running.service.account(uid)
    assert balance.credits == 1_000_000


async def test_a_delayed_payment_is_credited_once_it_succeeds(server: tuple[Running, StripeStandIn], uid: str) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    pending = {**paid(standin, session_id), "payment_status": "unpaid"}
    assert (await post(running, event("checkout.session.completed", pending))).json()["result"] == "no grant: unpaid"
    short = paid(standin, session_id, amount_total=10)
    refused = await post(running, event("checkout.session.async_payment_succeeded", short))
    assert refused.status_code == 200 and refused.json()["result"].startswith("refused: amount_total")
    await assert_nothing_credited(running, uid, session_id, status="unpaid")
    good = await post(running, event("checkout.session.async_payment_succeeded", paid(standin, session_id)))
    assert good.json()["result"] == "credited"
    # A late "failed" or "expired" for the credited session changes nothing.
    for kind in ("checkout.session.async_payment_failed", "checkout.session.expired"):
        assert (await post(running, event(kind, {**paid(standin, session_id), "status": "expired"}))).status_code == 200
    book = await ledger_of(running, uid)
    assert book["grants"] == [(200_000, session_id)] and book["payments"][0]["status"] == "paid"


async def test_a_paid_event_cannot_take_another_purchases_payment_intent(
    server: tuple[Running, StripeStandIn], uid: str
) -> None:
    """Refunds find a purchase by its PaymentIntent: B's session claiming A's would let A's refund debit B."""
    running, standin = server
    other = f"{uid}-b"
    first = await checkout(running, uid)
    second = await checkout(running, other)
    assert (await post(running, event("checkout.session.completed", paid(standin, first)))).json()["result"] == (
        "credited"
    )
    stolen = paid(standin, second, payment_intent=f"pi_{first}")
    response = await post(running, event("checkout.session.completed", stolen))
    assert response.status_code == 200
    assert response.json()["result"] == "refused: its PaymentIntent paid another checkout session"
    await assert_nothing_credited(running, other, second)

    # A's full refund takes A's tokens and nobody else's.
    charge = {"id": "ch_a", "object": "charge", "payment_intent": f"pi_{first}", "amount": 5000, "currency": "brl"}
    refund = await post(running, event("charge.refunded", {**charge, "amount_refunded": 5000}))
    assert refund.json()["result"] == "refund: 200000 tokens removed"
    assert (await ledger_of(running, uid))["entries"] == [("adjustment", -200_000), ("grant", 200_000)]
    await assert_nothing_credited(running, other, second)


@pytest.mark.parametrize(
    ("charge", "why"),
    [
        ({"amount": HUGE, "amount_refunded": HUGE}, "the charge's amount is not the purchase's 5000"),
        ({"amount": 1, "amount_refunded": 1}, "the charge's amount is not the purchase's 5000"),
        ({"amount": 5000, "amount_refunded": HUGE}, "not between 0 and the 5000 paid"),
        ({"amount": 5000, "amount_refunded": -5000}, "not between 0 and the 5000 paid"),
        ({"amount": 5000, "amount_refunded": 5000, "currency": "usd"}, "the charge is in 'usd'"),
        ({"amount": "5000", "amount_refunded": 5000}, "the charge's amount is not the purchase's 5000"),
    ],
)
async def test_a_refund_that_disagrees_with_the_purchase_debits_nothing(
    server: tuple[Running, StripeStandIn], uid: str, charge: dict[str, Any], why: str
) -> None:
    running, standin = server
    session_id = await checkout(running, uid)
    assert (await post(running, event("checkout.session.completed", paid(standin, session_id)))).status_code == 200
    forged = {"id": "ch_forged", "object": "charge", "payment_intent": f"pi_{session_id}", **charge}
    response = await post(running, event("charge.refunded", forged))
    assert response.status_code == 200
    result = response.json()["result"]
    assert result.startswith("refused: ") and why in result, result
    book = await ledger_of(running, uid)
    assert book["entries"] == [("grant", 200_000)] and book["credits"] == 200_000
    [row] = book["payments"]
    assert row["status"] == "paid"


async def test_a_payment_failure_naming_a_user_without_quotagates_reference(
    server: tuple[Running, StripeStandIn], uid: str
) -> None:
    """The failed-card event names a user in its metadata; only quotagate's checkout reference counts."""
    running, _ = server
    await checkout(running, uid)
    intent = {
        "id": "pi_forged_failure",
        "object": "payment_intent",
        "amount": HUGE,
        "currency": "brl",
        "metadata": {"user_id": uid, "package_id": "tokens_200k", "tokens": str(HUGE), "checkout_ref": "f" * 32},
        "last_payment_error": {"message": "declined\u0000" + "x" * 10_000},
    }
    response = await post(running, event("payment_intent.payment_failed", intent))
    assert response.status_code == 200 and response.json()["result"] == "ignored: not a quotagate payment"
    book = await ledger_of(running, uid)
    assert [r["status"] for r in book["payments"]] == ["open"]  # no failure row for this user
    async with pool(running).acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", uid) == 0


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_no_input_makes_the_webhook_fail(server: tuple[Running, StripeStandIn], uid: str) -> None:
    """Whatever is signed (or not): a 2xx or a 400, never a 5xx (which makes Stripe retry for days), and
    nothing credited; the genuine event still credits afterwards."""
    running, standin = server
    session_id = await checkout(running, uid)
    session = paid(standin, session_id)

    def completed(obj: Any, **top: Any) -> bytes:
        body = {"id": "evt_x", "type": "checkout.session.completed", "data": {"object": obj}, **top}
        return json.dumps(body).encode()

    bodies: dict[str, bytes] = {
        "empty": b"",
        "not json": b"not json at all",
        "not utf-8": b"\xff\xfe{}",
        "a list": b"[1, 2, 3]",
        "a number": b"1e999",
        "deep nesting": nested(100_000),
        "deep object": completed(json.loads(nested(50))),
        "huge integer text": b'{"id": ' + b"9" * 5000 + b"}",
        "no data": json.dumps({"type": "checkout.session.completed"}).encode(),
        "object is text": completed("cs_x"),
        "object is a list": completed([session]),
        "type is a number": json.dumps({"type": 7, "data": {"object": session}}).encode(),
        "id is a megabyte": completed({**session, "id": "cs_" + "a" * 1_000_000}),
        "id with NUL": completed({**session, "id": session_id + "\u0000"}),
        "id with a lone surrogate": completed({**session, "id": session_id + "\ud800"}),
        "id is a number": completed({**session, "id": HUGE}),
        "id is an object": completed({**session, "id": {"id": {"id": session_id}}}),
        "event id is a megabyte": completed({**session, "amount_total": 1}, id="evt_" + "x" * 1_000_000),
        # Without metadata quotagate's row still decides: here it names the buyer, and another one is named.
        "metadata is a list": completed({**session, "metadata": [1, 2], "client_reference_id": "someone-else"}),
        "metadata nested": completed({**session, "metadata": {"tokens": json.loads(nested(50))}}),
        "payment intent with NUL": completed({**session, "payment_intent": "pi_\u0000", "amount_total": 1}),
        "amount is a float": completed({**session, "amount_total": 5000.0}),
        "amount is true": completed({**session, "amount_total": True}),
        "amount is huge": completed({**session, "amount_total": -HUGE}),
        "unknown type": json.dumps({"type": "x" * 100_000, "data": {"object": {}}}).encode(),
        "refund of nothing": json.dumps(
            {"type": "charge.refunded", "data": {"object": {"payment_intent": []}}}
        ).encode(),
        "failure without id": json.dumps({"type": "payment_intent.payment_failed", "data": {"object": {}}}).encode(),
        "expired, huge": completed(
            {**session, "status": "expired", "id": "cs_" + "z" * 300}, type="checkout.session.expired"
        ),
    }
    statuses: dict[str, int] = {}
    for name, body in bodies.items():
        statuses[name] = (await post(running, body)).status_code
    # Headers no Stripe would send, on a genuine body.
    genuine = event("checkout.session.completed", {**session, "amount_total": 1})
    headers: dict[str, str | bytes] = {
        "non-ASCII signature": sign(genuine).replace("v1=", "v1=é").encode(),  # UTF-8 bytes on the wire
        "huge timestamp": "t=" + "9" * 5000 + ",v1=00",
        "empty parts": ",,,=,t=,v1=",
    }
    for name, header in headers.items():
        statuses[name] = (await post(running, genuine, header)).status_code
    assert {name: s for name, s in statuses.items() if s not in (200, 400)} == {}
    assert statuses["not json"] == statuses["deep nesting"] == statuses["non-ASCII signature"] == 400
    await assert_nothing_credited(running, uid, session_id)

    response = await post(running, event("checkout.session.completed", session))
    assert response.status_code == 200 and response.json()["result"] == "credited"
    assert (await ledger_of(running, uid))["grants"] == [(200_000, session_id)]


async def test_reconcile_applies_the_same_rule(server: tuple[Running, StripeStandIn], uid: str) -> None:
    """The admin's reconcile reads the session from Stripe's API and goes the webhook's way: a session whose
    amount is not the package's is not credited, and the admin is told why."""
    running, standin = server
    session_id = await checkout(running, uid)
    standin.sessions[session_id].update(amount_total=1)
    paid(standin, session_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port or running.grpc_port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.ReconcilePayment(admin_pb2.ReconcilePaymentRequest(session_id=session_id), metadata=ADMIN_MD)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount_total is not the package's price" in str(refused.value.details())
    await assert_nothing_credited(running, uid, session_id)
