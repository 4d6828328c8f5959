"""The `stripe:` and `packages:` settings, and the pure parts of billing: event reading, refund shares, prices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import quotagate
from quotagate.billing.events import Ignored, PaymentFailed, Refunded, SessionSettled, command_of
from quotagate.billing.gateway import CheckoutRequest, checkout_params, package_name
from quotagate.billing.store import _tokens_for
from quotagate.billing.web import format_price
from quotagate.config import ConfigError, Package, load_settings, parse_settings
from quotagate.core.messages import Language
from quotagate.core.notifications import NotificationKind, render

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT / "tests" / "configs" / "valid.yaml"
CUSTOMER_PACKAGES = [("tokens_200k", 200_000, 5000), ("tokens_500k", 500_000, 12000), ("tokens_1m", 1_000_000, 23000)]


def test_valid_file_reads_the_stripe_keys() -> None:
    s = load_settings(VALID, {})
    stripe = s.stripe
    assert stripe.enabled is True
    assert (stripe.secret_key, stripe.webhook_secret) == ("sk_test_from_file", "whsec_from_file")
    assert (stripe.success_url, stripe.cancel_url) == (
        "https://chat.example.com/obrigado",
        "https://chat.example.com/cancelado",
    )
    assert stripe.api_base == "https://stripe.example.com"
    assert stripe.tolerance_seconds == 120
    assert [(p.id, p.tokens, p.price, p.currency, p.active) for p in s.packages] == [
        ("tokens_200k", 200_000, 5000, "brl", True),
        ("tokens_500k", 500_000, 12000, "brl", True),
        ("tokens_1m", 1_000_000, 23000, "brl", True),
        ("promo_50k", 50_000, 1000, "brl", False),
    ]
    assert s.packages[2].name == "1 milhão de tokens"
    # Secrets never show in a repr (logs, tracebacks).
    assert "sk_test_from_file" not in repr(s) and "whsec_from_file" not in repr(s)


def test_the_environment_gives_the_secrets() -> None:
    s = load_settings(
        VALID, {"QUOTAGATE_STRIPE_SECRET_KEY": "sk_live_env", "QUOTAGATE_STRIPE_WEBHOOK_SECRET": "whsec_env"}
    )
    assert (s.stripe.secret_key, s.stripe.webhook_secret) == ("sk_live_env", "whsec_env")


def test_stripe_is_off_by_default_and_the_manual_path_stays() -> None:
    s = parse_settings({"credits_email": "creditos@example.com"}, "<test>", {})
    assert s.stripe.enabled is False and s.packages == ()
    assert s.purchase_hint == "mailto:creditos@example.com"


@pytest.mark.parametrize(
    "path", [ROOT / "deploy" / "quotagate.yaml", Path(quotagate.__file__).parent / "templates" / "demo.yaml"]
)
def test_example_configs_offer_the_customers_three_packages(path: Path) -> None:
    s = load_settings(path, {})
    assert [(p.id, p.tokens, p.price, p.currency) for p in s.packages] == [
        (i, t, price, "brl") for i, t, price in CUSTOMER_PACKAGES
    ]
    assert s.stripe.enabled is False


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"packages": [{"tokens": 1, "price": 1}]}, "packages[0].id", "required"),
        ({"packages": [{"id": "a b", "tokens": 1, "price": 1}]}, "packages[0].id", "letters"),
        ({"packages": [{"id": "p", "price": 1}]}, "packages[0].tokens", "at least 1"),
        ({"packages": [{"id": "p", "tokens": 5, "price": 0}]}, "packages[0].price", "at least 1"),
        ({"packages": [{"id": "p", "tokens": 5, "price": 9, "currency": "XYZ"}]}, "packages[0].currency", "BRL"),
        ({"packages": [{"id": "p", "tokens": 5, "price": 9, "colour": "red"}]}, "packages[0].colour", "unknown"),
        (
            {"packages": [{"id": "p", "tokens": 5, "price": 9}, {"id": "p", "tokens": 6, "price": 9}]},
            "packages",
            "twice",
        ),
        ({"stripe": {"enabled": "yes"}}, "stripe.enabled", "expected bool"),
        ({"stripe": {"success_url": "example.com/ok"}}, "stripe.success_url", "http(s) URL"),
        ({"stripe": {"tolerance_seconds": 0}}, "stripe.tolerance_seconds", "at least 1"),
        ({"stripe": {"webhook": "x"}}, "stripe.webhook", "unknown"),
    ],
)
def test_bad_stripe_settings_name_the_key(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(data, "<test>", {})
    assert f"<test>: {key}: " in str(err.value) and problem in str(err.value)


def test_production_refuses_stripe_without_its_secrets() -> None:
    base = {
        "production": True,
        "link_secret": "a-production-link-secret",
        "stripe": {"enabled": True},
        "packages": [{"id": "p", "tokens": 5, "price": 9}],
    }
    env = {
        "QUOTAGATE_ADMIN_TOKEN": "a-long-production-admin-token",
        # Production also needs the callers' own tokens (checked before Stripe's secrets).
        "QUOTAGATE_ENVOY_TOKEN": "a-long-production-envoy-token-0123456789",
        "QUOTAGATE_USAGE_TOKEN": "a-long-production-usage-token-0123456789",
    }
    with pytest.raises(ConfigError, match="QUOTAGATE_STRIPE_SECRET_KEY"):
        parse_settings(base, "<test>", env)
    with pytest.raises(ConfigError, match="QUOTAGATE_STRIPE_WEBHOOK_SECRET"):
        parse_settings(base, "<test>", {**env, "QUOTAGATE_STRIPE_SECRET_KEY": "sk_live_x"})
    s = parse_settings(
        base,
        "<test>",
        {**env, "QUOTAGATE_STRIPE_SECRET_KEY": "sk_live_x", "QUOTAGATE_STRIPE_WEBHOOK_SECRET": "whsec_x"},
    )
    assert s.stripe.enabled
    # Off, production needs neither.
    assert not parse_settings({**base, "stripe": {"enabled": False}}, "<test>", env).stripe.enabled


def session_object(**extra: Any) -> dict[str, Any]:
    return {
        "id": "cs_1",
        "object": "checkout.session",
        "payment_status": "paid",
        "status": "complete",
        "payment_intent": "pi_1",
        "amount_total": 5000,
        "currency": "brl",
        "client_reference_id": "ana",
        "metadata": {"user_id": "ana", "package_id": "tokens_200k", "tokens": "200000"},
        **extra,
    }


def test_events_are_read_into_commands() -> None:
    completed = command_of({"type": "checkout.session.completed", "data": {"object": session_object()}})
    assert isinstance(completed, SessionSettled) and not completed.failed
    session = completed.session
    assert (session.user_id, session.package_id, session.tokens, session.paid) == ("ana", "tokens_200k", 200_000, True)

    expanded = command_of(
        {"type": "checkout.session.completed", "data": {"object": session_object(payment_intent={"id": "pi_9"})}}
    )
    assert isinstance(expanded, SessionSettled) and expanded.session.payment_intent == "pi_9"

    late = command_of({"type": "checkout.session.async_payment_failed", "data": {"object": session_object()}})
    assert isinstance(late, SessionSettled) and late.failed

    failed = command_of(
        {
            "type": "payment_intent.payment_failed",
            "data": {
                "object": {
                    "id": "pi_2",
                    "amount": 12000,
                    "currency": "brl",
                    "metadata": {"user_id": "ana", "package_id": "tokens_500k", "checkout_ref": "ref1"},
                    "last_payment_error": {"message": "Insufficient funds."},
                }
            },
        }
    )
    # The metadata's user is not read: quotagate's checkout row, found by the reference, names the user.
    assert failed == PaymentFailed("pi_2", "ref1", 12000, "brl", "Insufficient funds.")

    refunded = command_of(
        {
            "type": "charge.refunded",
            "data": {"object": {"id": "ch_1", "payment_intent": "pi_1", "amount": 5000, "amount_refunded": 2500}},
        }
    )
    assert refunded == Refunded("pi_1", "ch_1", 5000, 2500)
    assert command_of({"type": "invoice.paid", "data": {"object": {}}}) == Ignored("invoice.paid")
    assert command_of({"type": "checkout.session.completed"}) == Ignored("checkout.session.completed")


def test_refund_shares() -> None:
    assert _tokens_for(200_000, 5000, 5000) == 200_000
    assert _tokens_for(200_000, 2500, 5000) == 100_000
    assert _tokens_for(200_000, 1, 3) == 66_666
    assert _tokens_for(200_000, 0, 5000) == 0
    assert _tokens_for(200_000, 6000, 5000) == 200_000


def test_checkout_params_and_names() -> None:
    package = Package("tokens_500k", 500_000, 12000)
    params = checkout_params(CheckoutRequest(package, "ana", "", "https://ok", "https://no"))
    assert params["mode"] == "payment" and "customer_email" not in params
    assert params["line_items"] == [
        {
            "quantity": 1,
            "price_data": {"currency": "brl", "unit_amount": 12000, "product_data": {"name": "500k tokens"}},
        }
    ]
    assert (
        params["metadata"]
        == params["payment_intent_data"]["metadata"]
        == {
            "user_id": "ana",
            "package_id": "tokens_500k",
            "tokens": "500000",
        }
    )
    assert package_name(Package("x", 1_000_000, 1)) == "1M tokens"
    assert package_name(Package("x", 1, 1, name="Pacote")) == "Pacote"
    assert format_price(Package("x", 1, 23000), Language.PT_BR) == "R$ 230,00"
    assert format_price(Package("x", 1, 123456), Language.PT_BR) == "R$ 1.234,56"
    assert format_price(Package("x", 1, 123456), Language.EN) == "R$ 1,234.56"


def test_payment_failed_mail_in_both_languages() -> None:
    pt = render(NotificationKind.PAYMENT_FAILED, Language.PT_BR, "Ana", "2026-11", 0, "mailto:c@example.com")
    en = render(NotificationKind.PAYMENT_FAILED, Language.EN, "", "2026-11", 0, "")
    assert (
        pt.subject == "Pagamento não aprovado" and "não foi aprovado" in pt.body and "mailto:c@example.com" in pt.body
    )
    assert en.subject == "Payment declined" and en.body.startswith("Hello,\n") and "declined" in en.body
