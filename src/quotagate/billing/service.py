"""Buying credits: Checkout Sessions out, verified Stripe events in, each paid session credited exactly once.

The webhook and the admin's reconcile take the same path (`_settle`), so a session credited by one is never
credited by the other."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe

from quotagate.billing.events import (
    CheckoutSession,
    Ignored,
    PaymentFailed,
    Refunded,
    SessionSettled,
    command_of,
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
        session = await self.gateway.create_session(
            CheckoutRequest(package, user_id, email, self.success_url, self.cancel_url)
        )
        if not session.id or not session.url:
            raise StripeUnavailable("Stripe answered a checkout session without an id or url")
        await self.store.record_open(session, package.tokens)
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
            stripe.Webhook.construct_event(text, signature, secret, self.settings.stripe.tolerance_seconds)
            event = json.loads(text)
        except (stripe.SignatureVerificationError, ValueError) as exc:
            raise BadEvent(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if not isinstance(event, dict):
            raise BadEvent("the event is not a JSON object")
        return event

    async def handle(self, event: dict[str, Any]) -> str:
        """Does what the event asks; returns a word on what was done (for the log and the response)."""
        event_id = str(event.get("id", ""))
        command = command_of(event)
        if isinstance(command, Ignored):
            return f"ignored {command.type or 'event'}"
        if isinstance(command, SessionSettled):
            if command.failed:
                return await self._session_failed(command.session, event_id)
            payment, granted = await self._settle(command.session, event_id)
            if payment is None:
                return "ignored: not a quotagate checkout session"
            return "credited" if granted else f"no grant: {payment.status}"
        if isinstance(command, PaymentFailed):
            return await self._payment_failed(command, event_id)
        return await self._refunded(command, event_id)

    async def _settle(self, session: CheckoutSession, event_id: str) -> tuple[PaymentRecord | None, bool]:
        """Credits a paid session once; records an unpaid one. None for sessions quotagate did not create."""
        if not session.id or not session.user_id or session.tokens <= 0:
            log.warning("checkout session without quotagate's metadata ignored", extra={"session_id": session.id})
            return None, False
        if not session.paid:
            # Card payments are paid at completion; delayed methods report later (async_payment_succeeded).
            status = {"open": "open", "expired": "expired"}.get(session.status, "unpaid")
            return await self.store.mark_unpaid(session, status, event_id), False
        await self.service.ledger.ensure_account(NewAccount(session.user_id), self.settings.default_plan)
        now = self.service.clock.now()
        cycle = self.service.cycle(now)
        label = self._package_label(session.package_id, session.tokens)
        reason = f"Bought {label} by card (Stripe Checkout session {session.id})"
        outcome = await self.store.credit(session, reason, cycle.key, now, event_id)
        if outcome.granted:
            log.info(
                "credits bought",
                extra={"user_id": session.user_id, "session_id": session.id, "tokens": session.tokens},
            )
        await self._publish(session.user_id)
        return outcome.payment, outcome.granted

    async def _session_failed(self, session: CheckoutSession, event_id: str) -> str:
        if not session.id or not session.user_id:
            return "ignored: not a quotagate checkout session"
        status = "expired" if session.status == "expired" else "failed"
        await self.store.mark_unpaid(session, status, event_id)
        return f"no grant: {status}"

    async def _payment_failed(self, failure: PaymentFailed, event_id: str) -> str:
        if not failure.payment_intent or not failure.user_id:
            return "ignored: not a quotagate payment"
        cycle = self.service.cycle(self.service.clock.now())
        recorded = await self.store.record_failure(failure, cycle.key, event_id)
        log.info(
            "card payment failed",
            extra={"user_id": failure.user_id, "payment_intent": failure.payment_intent, "first": bool(recorded)},
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
        payment, granted = await self._settle(session, "reconcile")
        if payment is None:
            raise InvalidRequest(f"session {session_id!r} was not created by quotagate (no user or package metadata)")
        return ReconcileResult(payment, granted, session)

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
