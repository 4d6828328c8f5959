"""Buying credits: Checkout Sessions out, verified Stripe events in, each paid session credited exactly once.

The webhook and the admin's reconcile take the same path (`_settle`), so a session credited by one is never
credited by the other.

quotagate's own payment row decides, never the event: a session is credited only when quotagate created it
(its row, written by `start_checkout`), it is paid (`payment_status == "paid"`) with exactly the row's amount
and currency, and the event's metadata (user, package, tokens, reference), where present, say what the row
says; then the row's tokens go to the row's user. Anything else is refused: one warning line with the session
id and why, nothing changed, and a 200 to Stripe (a redelivery would be refused the same way)."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import stripe

from quotagate.billing.events import (
    CheckoutSession,
    Ignored,
    PaymentFailed,
    Refunded,
    SessionSettled,
    command_of,
    stripe_id,
)
from quotagate.billing.gateway import CheckoutRequest, StripeGateway, StripeUnavailable, package_name
from quotagate.billing.store import STATUSES, PaymentRecord, PaymentStore
from quotagate.config import Package
from quotagate.core.errors import InvalidRequest, NotFound, StoreUnavailable
from quotagate.links import PURCHASE_PATH
from quotagate.service import QuotaService, validate_id
from quotagate.store.ports import NewAccount

__all__ = ["BadEvent", "Billing", "ReconcileResult"]

log = logging.getLogger("quotagate.billing")

DONE_PATH = f"{PURCHASE_PATH}/done"
CANCELLED_PATH = f"{PURCHASE_PATH}/cancelled"


class BadEvent(ValueError):
    """The webhook's signature, timestamp or body does not check out."""


@dataclass(frozen=True)
class ReconcileResult:
    payment: PaymentRecord | None
    granted: bool
    session: CheckoutSession
    refused: str = ""  # why the session was not credited although paid (it disagrees with quotagate's row)


@dataclass(frozen=True)
class Settlement:
    payment: PaymentRecord | None  # None: no checkout session of quotagate's
    granted: bool
    refused: str = ""


NOT_OURS = "not a checkout session quotagate created"


def disagreement(payment: PaymentRecord, session: CheckoutSession) -> str:
    """Why the session's metadata contradicts quotagate's row for it, or "". Absent fields contradict nothing:
    the row decides either way."""
    meta = session.metadata
    if session.client_reference_id and session.client_reference_id != payment.user_id:
        return "its client_reference_id names another user than the one quotagate sold it to"
    if "user_id" in meta and meta["user_id"] != payment.user_id:
        return "its metadata names another user than the one quotagate sold it to"
    if "package_id" in meta and meta["package_id"] != payment.package_id:
        return "its metadata names another package than the one quotagate sold"
    if "tokens" in meta and meta["tokens"] != str(payment.tokens):
        return f"its metadata tokens differ from the {payment.tokens} of the package quotagate sold"
    if payment.checkout_ref and "checkout_ref" in meta and meta["checkout_ref"] != payment.checkout_ref:
        return "its metadata reference is not quotagate's for this session"
    return ""


def underpaid(payment: PaymentRecord, session: CheckoutSession) -> str:
    """Why a paid session did not pay the package in full, or ""."""
    if session.currency != payment.currency:
        return f"paid in {session.currency[:8]!r}, the package is sold in {payment.currency!r}"
    if session.amount_total != payment.amount:
        return f"amount_total is not the package's price {payment.amount} {payment.currency}"
    return ""


class Billing:
    def __init__(self, service: QuotaService, store: PaymentStore, gateway: StripeGateway) -> None:
        self.service = service
        self.settings = service.settings
        self.store = store
        self.gateway = gateway
        public = self.settings.public_url
        self.success_url = self.settings.stripe.success_url or f"{public}{DONE_PATH}"
        self.cancel_url = self.settings.stripe.cancel_url or f"{public}{CANCELLED_PATH}"

    @property
    def enabled(self) -> bool:
        return self.settings.stripe.enabled

    def active_packages(self) -> list[Package]:
        return [p for p in self.settings.packages if p.active]

    def package(self, package_id: str) -> Package:
        for package in self.active_packages():
            if package.id == package_id:
                return package
        offered = ", ".join(p.id for p in self.active_packages()) or "none"
        raise InvalidRequest(f"no package {package_id!r} on sale; packages: {offered}")

    # -- checkout ------------------------------------------------------------------------------------

    async def start_checkout(self, user_id: str, email: str, package_id: str) -> CheckoutSession:
        """A new Checkout Session for this user and package, recorded as open."""
        package = self.package(package_id)
        if not self.gateway.configured:
            raise StripeUnavailable("Stripe's secret key is not configured (QUOTAGATE_STRIPE_SECRET_KEY)")
        ref = secrets.token_hex(16)
        session = await self.gateway.create_session(
            CheckoutRequest(package, user_id, email, self.success_url, self.cancel_url, ref)
        )
        if not session.id or not session.url:
            raise StripeUnavailable("Stripe answered a checkout session without an id or url")
        try:
            # What quotagate sold, from its own settings: the webhook credits this row, not the event.
            await self.store.record_open(session.id, session.payment_intent, user_id, package, ref)
        except asyncpg.UniqueViolationError:
            raise StripeUnavailable(f"Stripe answered a session id quotagate already has: {session.id}") from None
        log.info(
            "checkout session created",
            extra={"user_id": user_id, "package_id": package.id, "session_id": session.id},
        )
        return session

    # -- webhook -------------------------------------------------------------------------------------

    def verify(self, payload: bytes, signature: str) -> dict[str, Any]:
        """The event, if the Stripe-Signature header signs this very body with the webhook secret, recently."""
        secret = self.settings.stripe.webhook_secret
        if not secret:
            raise BadEvent("the webhook secret is not configured (QUOTAGATE_STRIPE_WEBHOOK_SECRET)")
        try:
            text = payload.decode("utf-8")
            stripe.WebhookSignature.verify_header(text, signature, secret, self.settings.stripe.tolerance_seconds)
            event = json.loads(text)
        # TypeError: hmac refuses a non-ASCII signature; RecursionError: JSON nested too deep.
        except (stripe.SignatureVerificationError, ValueError, TypeError, RecursionError) as exc:
            raise BadEvent(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None
        if not isinstance(event, dict):
            raise BadEvent("the event is not a JSON object")
        return event

    async def handle(self, event: dict[str, Any]) -> str:
        """Does what the event asks; returns a word on what was done (for the log and the response)."""
        event_id = stripe_id(event.get("id"))
        command = command_of(event)
        if isinstance(command, Ignored):
            return f"ignored {command.type[:100] or 'event'}"
        if isinstance(command, SessionSettled):
            if command.failed:
                return await self._session_failed(command.session, event_id)
            settled = await self._settle(command.session, event_id)
            if settled.payment is None:
                return f"ignored: {NOT_OURS}"
            if settled.refused:
                return f"refused: {settled.refused}"
            return "credited" if settled.granted else f"no grant: {settled.payment.status}"
        if isinstance(command, PaymentFailed):
            return await self._payment_failed(command, event_id)
        return await self._refunded(command, event_id)

    def _refuse(self, session_id: str, why: str) -> None:
        log.warning("stripe checkout session %s not credited: %s", session_id or "(no id)", why,
                    extra={"session_id": session_id})  # fmt: skip

    async def _settle(self, session: CheckoutSession, event_id: str) -> Settlement:
        """Credits a paid session of quotagate's once, as its row says; records an unpaid one."""
        payment = await self.store.get(session.id) if session.id else None
        if payment is None:
            self._refuse(session.id, NOT_OURS)
            return Settlement(None, False, NOT_OURS)
        if payment.grant_id is not None:
            return Settlement(payment, False)  # a redelivery: credited before
        why = disagreement(payment, session)
        if why:
            self._refuse(session.id, why)
            return Settlement(payment, False, why)
        if not session.paid:
            # Card payments are paid at completion; delayed methods report later (async_payment_succeeded).
            status = {"open": "open", "expired": "expired"}.get(session.status, "unpaid")
            return Settlement(await self.store.mark_unpaid(payment, status, event_id), False)
        why = underpaid(payment, session)
        if why:
            self._refuse(session.id, why)
            return Settlement(payment, False, why)
        await self.service.ledger.ensure_account(NewAccount(payment.user_id), self.settings.default_plan)
        now = self.service.clock.now()
        cycle = self.service.cycle(now)
        label = self._package_label(payment.package_id, payment.tokens)
        reason = f"Bought {label} by card (Stripe Checkout session {payment.session_id})"
        outcome = await self.store.credit(payment, session.payment_intent, reason, cycle.key, now, event_id)
        if outcome.refused:
            self._refuse(session.id, outcome.refused)
            return Settlement(outcome.payment, False, outcome.refused)
        if outcome.granted:
            log.info(
                "credits bought",
                extra={"user_id": payment.user_id, "session_id": payment.session_id, "tokens": payment.tokens},
            )
            await self._publish(payment.user_id)
        return Settlement(outcome.payment, outcome.granted)

    async def _session_failed(self, session: CheckoutSession, event_id: str) -> str:
        payment = await self.store.get(session.id) if session.id else None
        if payment is None:
            self._refuse(session.id, NOT_OURS)
            return f"ignored: {NOT_OURS}"
        why = disagreement(payment, session)
        if why:
            self._refuse(session.id, why)
            return f"refused: {why}"
        status = "expired" if session.status == "expired" else "failed"
        await self.store.mark_unpaid(payment, status, event_id)
        return f"no grant: {status}"

    async def _payment_failed(self, failure: PaymentFailed, event_id: str) -> str:
        if not failure.payment_intent:
            return "ignored: not a quotagate payment"
        # The user told is the one quotagate sold the checkout to, found by quotagate's own reference.
        checkout = await self.store.checkout_of(failure.ref, failure.payment_intent)
        if checkout is None:
            log.warning("stripe payment failure %s ignored: %s", failure.payment_intent,
                        "no checkout session of quotagate's has its reference or PaymentIntent")  # fmt: skip
            return "ignored: not a quotagate payment"
        cycle = self.service.cycle(self.service.clock.now())
        recorded = await self.store.record_failure(failure, checkout, cycle.key, event_id)
        log.info(
            "card payment failed",
            extra={"user_id": checkout.user_id, "payment_intent": failure.payment_intent, "first": bool(recorded)},
        )
        return "payment failed" if recorded else "payment failure seen before"

    async def _refunded(self, refund: Refunded, event_id: str) -> str:
        if not refund.payment_intent:
            return "ignored: refund without a payment intent"
        now = self.service.clock.now()
        cycle = self.service.cycle(now)
        outcome = await self.store.refund(refund, cycle.key, now, event_id)
        if outcome is None:
            return "ignored: no credited payment for this charge"
        if outcome.refused:
            log.warning("stripe refund of %s (session %s) not applied: %s", refund.payment_intent,
                        outcome.payment.session_id, outcome.refused)  # fmt: skip
            return f"refused: {outcome.refused}"
        if outcome.removed:
            await self._publish(outcome.payment.user_id)
        log.info(
            "payment refunded",
            extra={"user_id": outcome.payment.user_id, "session_id": outcome.payment.session_id,
                   "removed": outcome.removed},
        )  # fmt: skip
        return f"refund: {outcome.removed} tokens removed"

    async def _publish(self, user_id: str) -> None:
        """Tells Redis about the committed change, so the next Check sees it at once."""
        now = self.service.clock.now()
        snapshot = await self.service.ledger.snapshot(user_id, self.service.cycle(now).key, now)
        try:
            await self.service.hot.load(snapshot)
        except StoreUnavailable as exc:
            # The grant is committed; the sweeper's refresh_stale() catches Redis up.
            self.service._mark_stale(user_id, exc)

    def _package_label(self, package_id: str, tokens: int) -> str:
        for package in self.settings.packages:
            if package.id == package_id:
                return f"package {package.id} ({package_name(package)})"
        return f"package {package_id or '?'} ({tokens} tokens)"

    # -- admin ---------------------------------------------------------------------------------------

    async def reconcile(self, session_id: str) -> ReconcileResult:
        """Reads the session from Stripe and credits it if paid (once, whoever comes first)."""
        session_id = validate_id("session_id", session_id)
        if not self.gateway.configured:
            raise InvalidRequest("Stripe's secret key is not configured (QUOTAGATE_STRIPE_SECRET_KEY)")
        try:
            session = await self.gateway.retrieve_session(session_id)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        except StripeUnavailable as exc:
            raise StoreUnavailable(str(exc)) from None
        settled = await self._settle(session, "reconcile")
        if settled.payment is None:
            raise InvalidRequest(f"session {session_id!r} was not created by quotagate (no payment row for it)")
        if settled.refused:
            raise InvalidRequest(f"session {session_id!r} is not credited: {settled.refused}")
        return ReconcileResult(settled.payment, settled.granted, session, settled.refused)

    async def search(
        self,
        user_id: str,
        status: str,
        session_id: str,
        start: datetime | None,
        end: datetime | None,
        before_id: int,
        limit: int,
    ) -> list[PaymentRecord]:
        if status and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
        if start and end and start >= end:
            raise InvalidRequest("start must be before end")
        return await self.store.search(user_id.strip(), status, session_id.strip(), start, end, before_id, limit)

    async def close(self) -> None:
        await self.gateway.close()
