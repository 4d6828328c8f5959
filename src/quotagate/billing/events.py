"""What a verified Stripe event asks of us, read from its JSON. Pure: no I/O, no Stripe client.

Only the fields used are read, so newer API versions that add fields change nothing here. A signed event is
still only a claim: what it names (session, PaymentIntent) is looked up in quotagate's own payment rows, and
its amounts and metadata are compared with them, never credited from. Fields of the wrong type or shape read
as empty, so no event can raise here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REF_KEY",
    "CheckoutSession",
    "Ignored",
    "PaymentFailed",
    "Refunded",
    "SessionSettled",
    "StripeCommand",
    "command_of",
    "session_of",
    "stripe_id",
]

# The metadata key of quotagate's random reference for a checkout (on the session and its PaymentIntent).
REF_KEY = "checkout_ref"
# Stripe's ids (cs_..., pi_..., ch_..., evt_...) are short ASCII words; anything else is not one of them, and
# never reaches PostgreSQL or a log line (NUL bytes, lone surrogates, megabytes).
_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_NOT_TEXT = "\x00not text"


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str
    status: str  # open | complete | expired
    payment_status: str  # paid | unpaid | no_payment_required
    payment_intent: str
    amount_total: int
    currency: str
    client_reference_id: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def user_id(self) -> str:
        return self.metadata.get("user_id", "") or self.client_reference_id

    @property
    def package_id(self) -> str:
        return self.metadata.get("package_id", "")

    @property
    def tokens(self) -> int:
        """What the metadata says; informative only (the payment row's tokens are what is credited)."""
        raw = self.metadata.get("tokens", "")
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else 0

    @property
    def ref(self) -> str:
        return self.metadata.get(REF_KEY, "")

    @property
    def paid(self) -> bool:
        return self.payment_status == "paid"


@dataclass(frozen=True)
class SessionSettled:
    """A checkout session finished: credited when paid (async methods pay later, or fail); `failed` when its
    delayed payment failed or it expired unpaid."""

    session: CheckoutSession
    failed: bool = False


@dataclass(frozen=True)
class PaymentFailed:
    """A declined card. `ref` (from the PaymentIntent's metadata) finds quotagate's checkout, which names the
    user; the metadata's own user id is never trusted."""

    payment_intent: str
    ref: str
    amount: int
    currency: str
    message: str


@dataclass(frozen=True)
class Refunded:
    """A charge was refunded, wholly or in part; amount_refunded is the running total."""

    payment_intent: str
    charge_id: str
    amount: int
    amount_refunded: int
    currency: str = ""


@dataclass(frozen=True)
class Ignored:
    type: str


StripeCommand = SessionSettled | PaymentFailed | Refunded | Ignored


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, Mapping):  # an expanded object: its id
        value = value.get("id")
    return value if isinstance(value, str) else ""


def stripe_id(value: object) -> str:
    """The value if it looks like a Stripe id, else ""."""
    return value if isinstance(value, str) and _ID.fullmatch(value) else ""


def _id(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, Mapping):  # an expanded object: its id
        value = value.get("id")
    return stripe_id(value)


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _metadata(data: Mapping[str, Any]) -> dict[str, str]:
    raw = data.get("metadata")
    if not isinstance(raw, Mapping):
        return {}
    # Stripe's metadata values are strings; any other value stays, as text no record ever holds.
    return {str(k): v if isinstance(v, str) else _NOT_TEXT for k, v in raw.items() if isinstance(k, str)}


def session_of(data: Mapping[str, Any]) -> CheckoutSession:
    """A Checkout Session object (from an event or from the API)."""
    return CheckoutSession(
        id=_id(data, "id"),
        url=_text(data, "url"),
        status=_text(data, "status"),
        payment_status=_text(data, "payment_status"),
        payment_intent=_id(data, "payment_intent"),
        amount_total=_int(data, "amount_total"),
        currency=_text(data, "currency").lower(),
        client_reference_id=_text(data, "client_reference_id"),
        metadata=_metadata(data),
    )


def command_of(event: Mapping[str, Any]) -> StripeCommand:
    kind = event.get("type")
    kind = kind if isinstance(kind, str) else ""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        return Ignored(kind)
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return SessionSettled(session_of(obj))
    if kind in ("checkout.session.async_payment_failed", "checkout.session.expired"):
        return SessionSettled(session_of(obj), failed=True)
    if kind == "payment_intent.payment_failed":
        error = obj.get("last_payment_error")
        message = _text(error, "message") if isinstance(error, Mapping) else ""
        return PaymentFailed(
            payment_intent=_id(obj, "id"),
            ref=stripe_id(_metadata(obj).get(REF_KEY)),
            amount=_int(obj, "amount"),
            currency=_text(obj, "currency").lower(),
            # Kept as text in PostgreSQL: no NUL, no lone surrogate, one short line.
            message=" ".join(message.replace("\x00", "").encode("utf-8", "replace").decode().split())[:500],
        )
    if kind == "charge.refunded":
        return Refunded(
            payment_intent=_id(obj, "payment_intent"),
            charge_id=_id(obj, "id"),
            amount=_int(obj, "amount"),
            amount_refunded=_int(obj, "amount_refunded"),
            currency=_text(obj, "currency").lower(),
        )
    return Ignored(kind)
