"""What a verified Stripe event asks of us, read from its JSON. Pure: no I/O, no Stripe client.

Only the fields used are read, so newer API versions that add fields change nothing here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CheckoutSession",
    "Ignored",
    "PaymentFailed",
    "Refunded",
    "SessionSettled",
    "StripeCommand",
    "command_of",
    "session_of",
]


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
        raw = self.metadata.get("tokens", "")
        return int(raw) if raw.isdigit() else 0

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
    payment_intent: str
    user_id: str
    package_id: str
    tokens: int
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


@dataclass(frozen=True)
class Ignored:
    type: str


StripeCommand = SessionSettled | PaymentFailed | Refunded | Ignored


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, Mapping):  # an expanded object: its id
        value = value.get("id")
    return value if isinstance(value, str) else ""


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _metadata(data: Mapping[str, Any]) -> dict[str, str]:
    raw = data.get("metadata")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items()}


def session_of(data: Mapping[str, Any]) -> CheckoutSession:
    """A Checkout Session object (from an event or from the API)."""
    return CheckoutSession(
        id=_text(data, "id"),
        url=_text(data, "url"),
        status=_text(data, "status"),
        payment_status=_text(data, "payment_status"),
        payment_intent=_text(data, "payment_intent"),
        amount_total=_int(data, "amount_total"),
        currency=_text(data, "currency"),
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
        metadata = _metadata(obj)
        error = obj.get("last_payment_error")
        message = _text(error, "message") if isinstance(error, Mapping) else ""
        tokens = metadata.get("tokens", "")
        return PaymentFailed(
            payment_intent=_text(obj, "id"),
            user_id=metadata.get("user_id", ""),
            package_id=metadata.get("package_id", ""),
            tokens=int(tokens) if tokens.isdigit() else 0,
            amount=_int(obj, "amount"),
            currency=_text(obj, "currency"),
            message=message,
        )
    if kind == "charge.refunded":
        return Refunded(
            payment_intent=_text(obj, "payment_intent"),
            charge_id=_text(obj, "id"),
            amount=_int(obj, "amount"),
            amount_refunded=_int(obj, "amount_refunded"),
        )
    return Ignored(kind)
