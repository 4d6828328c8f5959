"""The e-mails around a card payment, through the real outbox and a real local SMTP server: credits added
after a paid session, and a declined card (nothing granted, the attempt recorded once)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from harness import ADMIN_TOKEN, make_settings
from stripe_standin import StripeStandIn, event, sign
from test_notifications import Inbox, Mail, smtp_notifications

from quotagate.core.messages import Language
from quotagate.core.notifications import NotificationKind, render
from quotagate.procs import free_port
from quotagate.server import Running, start
from quotagate.store.ports import AccountChanges
from quotagate.v1 import admin_pb2, admin_pb2_grpc


@pytest.fixture
def mail() -> Iterator[Mail]:
    server = Mail(Inbox(), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def running(
    database_url: str, redis_url: str, redis_prefix: str, mail: Mail
) -> AsyncIterator[tuple[Running, StripeStandIn]]:
    standin = await StripeStandIn().start()
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        language="pt-BR",
        notifications=smtp_notifications(mail),
        stripe=standin.settings(),
        packages=[{"id": "tokens_200k", "tokens": 200_000, "price": 5000}],
    )
    started = await start(settings)
    yield started, standin
    await started.stop()
    await standin.stop()


async def post(running: Running, payload: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"http://127.0.0.1:{running.http_port}/webhooks/stripe",
            content=payload,
            headers={"stripe-signature": sign(payload), "content-type": "application/json"},
        )


async def received(mail: Mail, address: str, count: int) -> list[str]:
    for _ in range(200):
        if len(mail.inbox.to(address)) >= count:
            return mail.inbox.subjects(address)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} got {mail.inbox.subjects(address)}")


async def new_user(running: Running, uid: str) -> str:
    address = f"{uid}@example.com"
    changes = AccountChanges(email=address, name="Ana")
    await running.service.upsert_account(uid, changes, "The user signed up today.", "test")
    return address


async def test_a_declined_card_notifies_once_and_grants_nothing(
    running: tuple[Running, StripeStandIn], mail: Mail, uid: str
) -> None:
    server, standin = running
    address = await new_user(server, uid)
    await checkout(server, uid)
    # The PaymentIntent carries the metadata quotagate gave Stripe at checkout, reference included.
    form = standin.requests[-1]["form"]
    prefix = "payment_intent_data[metadata]["
    metadata = {k[len(prefix) : -1]: str(v) for k, v in form.items() if k.startswith(prefix)}
    assert metadata["user_id"] == uid and len(metadata["checkout_ref"]) == 32
    intent = {
        "id": f"pi_{uid}",
        "object": "payment_intent",
        "amount": 5000,
        "currency": "brl",
        "status": "requires_payment_method",
        "metadata": metadata,
        "last_payment_error": {"code": "card_declined", "message": "Your card was declined."},
    }
    # A failure naming the user but no checkout of quotagate's (the old behaviour mailed whoever it named).
    forged = {**intent, "id": f"pi_forged_{uid}", "metadata": {**metadata, "checkout_ref": "0" * 32}}
    response = await post(server, event("payment_intent.payment_failed", forged))
    assert response.status_code == 200 and response.json()["result"] == "ignored: not a quotagate payment"

    payload = event("payment_intent.payment_failed", intent)
    results = [(await post(server, payload)).json()["result"] for _ in range(3)]
    assert results == ["payment failed", "payment failure seen before", "payment failure seen before"]

    assert await received(mail, address, 1) == ["Pagamento não aprovado"]
    body = mail.inbox.to(address)[0].get_content()
    expected = render(
        NotificationKind.PAYMENT_FAILED, Language.PT_BR, "Ana", "", 200_000, "mailto:creditos@example.com"
    )
    assert body.replace("\r\n", "\n").strip() == expected.body.strip()
    await asyncio.sleep(0.3)
    assert len(mail.inbox.to(address)) == 1

    _, balance = await server.service.account(uid)
    assert balance.credits == 0
    async with grpc_admin(server) as admin:
        reply = await admin.ListPayments(admin_pb2.ListPaymentsRequest(user_id=uid, status="failed"), metadata=MD)
    [failed] = reply.payments
    assert failed.payment_intent == f"pi_{uid}" and failed.session_id == "" and failed.grant_id == 0
    assert failed.failure_message == "Your card was declined."


async def checkout(server: Running, uid: str) -> str:
    """Follows the user's signed purchase link; returns the Checkout Session id."""
    async with httpx.AsyncClient(timeout=30) as client:
        link = server.service.links.purchase_url(uid, server.service.clock.now())
        path_and_query = link.split("/v1/", 1)[1]
        response = await client.get(f"http://127.0.0.1:{server.http_port}/v1/{path_and_query}&package=tokens_200k")
    assert response.status_code == 303
    return response.headers["location"].rsplit("/", 1)[1]


async def test_a_paid_session_sends_credits_added(running: tuple[Running, StripeStandIn], mail: Mail, uid: str) -> None:
    server, standin = running
    address = await new_user(server, uid)
    session_id = await checkout(server, uid)
    # Stripe was told the buyer's e-mail, so Checkout asks for nothing twice.
    assert standin.requests[-1]["form"]["customer_email"] == address
    assert (await post(server, event("checkout.session.completed", standin.pay(session_id)))).status_code == 200
    assert await received(mail, address, 1) == ["Créditos adicionados"]
    assert "200000" in mail.inbox.to(address)[0].get_content()


MD = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@contextlib.asynccontextmanager
async def grpc_admin(server: Running) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield admin_pb2_grpc.AdminStub(channel)
