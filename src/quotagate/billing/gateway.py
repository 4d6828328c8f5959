"""Stripe's API: creating and reading Checkout Sessions, without blocking the event loop.

The stripe package's async methods over its aiohttp HTTP client; the API address comes from settings so tests
point it at a local stand-in."""

from __future__ import annotations

from typing import Any

import aiohttp
import stripe

from quotagate.billing.events import REF_KEY, CheckoutSession, session_of
from quotagate.config import Package, StripeSettings

__all__ = ["CheckoutRequest", "StripeGateway", "StripeUnavailable", "checkout_params"]

# Retries of a create carry the same idempotency key (the stripe package adds it), so they never duplicate.
NETWORK_RETRIES = 2
TIMEOUT_SECONDS = 20.0


class StripeUnavailable(Exception):
    """Stripe's API could not be reached or refused the call."""


class CheckoutRequest:
    def __init__(
        self, package: Package, user_id: str, email: str, success_url: str, cancel_url: str, ref: str = ""
    ) -> None:
        self.package = package
        self.user_id = user_id
        self.email = email
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.ref = ref  # quotagate's random reference for this checkout, kept in its payment row


def package_name(package: Package) -> str:
    """The configured name, else a language-neutral one: "200k tokens", "1M tokens"."""
    if package.name:
        return package.name
    tokens = package.tokens
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if tokens >= size and tokens % (size // 10) == 0:
            return f"{tokens / size:g}{suffix} tokens"
    return f"{tokens} tokens"


def checkout_params(request: CheckoutRequest) -> dict[str, Any]:
    """The Checkout Session to create: one line item at the package's price, the user, package and quotagate's
    reference in metadata (copied to the PaymentIntent too, so a failed-payment event finds the checkout)."""
    package = request.package
    metadata = {"user_id": request.user_id, "package_id": package.id, "tokens": str(package.tokens)}
    if request.ref:
        metadata[REF_KEY] = request.ref
    params: dict[str, Any] = {
        "mode": "payment",
        "client_reference_id": request.user_id,
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": package.currency,
                    "unit_amount": package.price,
                    "product_data": {"name": package_name(package)},
                },
            }
        ],
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
    }
    if request.email:
        params["customer_email"] = request.email
    return params


class StripeGateway:
    def __init__(self, settings: StripeSettings) -> None:
        self._http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))
        self._client = stripe.StripeClient(
            settings.secret_key or "sk_not_configured",
            base_addresses={"api": settings.api_base},
            http_client=self._http,
            max_network_retries=NETWORK_RETRIES,
        )
        self.configured = bool(settings.secret_key)

    async def create_session(self, request: CheckoutRequest) -> CheckoutSession:
        try:
            created = await self._client.v1.checkout.sessions.create_async(checkout_params(request))  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"creating the checkout session failed: {_describe(exc)}") from exc
        return session_of(created.to_dict())

    async def retrieve_session(self, session_id: str) -> CheckoutSession:
        try:
            found = await self._client.v1.checkout.sessions.retrieve_async(session_id)
        except stripe.InvalidRequestError as exc:
            raise LookupError(f"Stripe has no checkout session {session_id!r}: {_describe(exc)}") from exc
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"reading the checkout session failed: {_describe(exc)}") from exc
        return session_of(found.to_dict())

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]


def _describe(exc: stripe.StripeError) -> str:
    # user_message is Stripe's own short text; never the request (it carries the secret key's header).
    return f"{type(exc).__name__}: {exc.user_message or 'no details'} (HTTP {exc.http_status or '-'})"
