"""Who is asking (client key, x-user-id) and the OpenAI-style denial bodies (DESIGN.md "Wire contract")."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from quotagate.adapters.ext_authz import Rejected, bearer, identify
from quotagate.adapters.openai_errors import HttpDenial, quota_denial
from quotagate.config import Settings, parse_settings
from quotagate.core.decide import Decision, Verdict
from quotagate.core.messages import MAX_MESSAGE_CHARS
from quotagate.core.model import AccountLimits, AccountStatus, Balance

CHAT_KEY = "chat-key-0123"
PERSONAL_KEY = "personal-key-4567"
RESET = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # 2026-12-01 00:00 in São Paulo


def make_settings(**overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "timezone": "America/Sao_Paulo",
        "language": "en",
        "credits_email": "creditos@example.com",
        "plans": [{"id": "small", "monthly_allowance": 1000}],
        "clients": [
            {"name": "chat", "key": CHAT_KEY, "trusted": True},
            {"name": "personal", "key": PERSONAL_KEY, "trusted": False, "user_id": "alice"},
        ],
    }
    data.update(overrides)
    return parse_settings(data, "<test>", {})


SETTINGS = make_settings()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def error_of(denial: HttpDenial) -> dict[str, Any]:
    assert denial.headers["content-type"] == "application/json"
    payload = json.loads(denial.body)
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    text = error["message"]
    assert isinstance(text, str) and text
    assert len(text) <= MAX_MESSAGE_CHARS and "\n" not in text
    return error


def rejected(settings: Settings, headers: dict[str, str]) -> Rejected:
    with pytest.raises(Rejected) as info:
        identify(settings, headers)
    return info.value


def assert_401(exc: Rejected) -> dict[str, Any]:
    assert exc.denial.status == 401
    error = error_of(exc.denial)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    return error


# -- bearer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer sk-with spaces", "sk-with spaces"),
    ],
)
def test_bearer_extracts_the_token(value: str, expected: str) -> None:
    assert bearer({"authorization": value}) == expected


@pytest.mark.parametrize("value", ["", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz", "abc", "Token abc"])
def test_bearer_rejects_other_forms(value: str) -> None:
    assert bearer({"authorization": value}) is None


def test_bearer_without_the_header() -> None:
    assert bearer({}) is None
    assert bearer({"x-api-key": "abc"}) is None


# -- identify: trusted clients ---------------------------------------------------------------------------------


def test_trusted_client_asserts_the_user() -> None:
    headers = {**auth(CHAT_KEY), "x-user-id": "bob", "x-user-email": "bob@example.com", "x-user-name": "Bob"}
    client, account = identify(SETTINGS, headers)
    assert client.name == "chat"
    assert account.user_id == "bob"
    assert account.email == "bob@example.com"
    assert account.name == "Bob"


def test_trusted_client_user_id_is_trimmed() -> None:
    _, account = identify(SETTINGS, {**auth(CHAT_KEY), "x-user-id": "  bob  "})
    assert account.user_id == "bob"


@pytest.mark.parametrize("user", [None, "", "   "])
def test_trusted_client_without_user_is_401(user: str | None) -> None:
    headers = auth(CHAT_KEY)
    if user is not None:
        headers["x-user-id"] = user
    error = assert_401(rejected(SETTINGS, headers))
    assert "x-user-id" in error["message"]


def test_trusted_client_overlong_email_and_name_are_cut() -> None:
    headers = {**auth(CHAT_KEY), "x-user-id": "bob", "x-user-email": "e" * 5000, "x-user-name": "n" * 5000}
    _, account = identify(SETTINGS, headers)
    assert 0 < len(account.email) < 5000
    assert 0 < len(account.name) < 5000


# -- identify: untrusted clients --------------------------------------------------------------------------------


def test_untrusted_client_without_x_user_id_acts_for_its_user() -> None:
    client, account = identify(SETTINGS, auth(PERSONAL_KEY))
    assert client.name == "personal"
    assert account.user_id == "alice"


def test_untrusted_client_asserting_its_own_user_is_fine() -> None:
    _, account = identify(SETTINGS, {**auth(PERSONAL_KEY), "x-user-id": "alice"})
    assert account.user_id == "alice"


def test_untrusted_client_asserting_another_user_is_401() -> None:
    exc = rejected(SETTINGS, {**auth(PERSONAL_KEY), "x-user-id": "bob"})
    assert_401(exc)


def test_untrusted_client_cannot_set_email_or_name() -> None:
    headers = {**auth(PERSONAL_KEY), "x-user-email": "mallory@example.com", "x-user-name": "Mallory"}
    _, account = identify(SETTINGS, headers)
    assert account.user_id == "alice"
    assert "mallory" not in account.email.lower()
    assert "mallory" not in account.name.lower()


# -- identify: bad keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-user-id": "bob"},
        {"authorization": "Bearer not-a-known-key", "x-user-id": "bob"},
        {"authorization": f"Basic {CHAT_KEY}", "x-user-id": "bob"},
        {"authorization": CHAT_KEY, "x-user-id": "bob"},
        {"authorization": "Bearer ", "x-user-id": "bob"},
    ],
)
def test_missing_or_unknown_key_is_401(headers: dict[str, str]) -> None:
    error = assert_401(rejected(SETTINGS, headers))
    assert "key" in error["message"].lower()


def test_no_clients_configured_rejects_every_key() -> None:
    assert_401(rejected(make_settings(clients=[]), {**auth(CHAT_KEY), "x-user-id": "bob"}))


def test_401_messages_differ_per_cause() -> None:
    unknown = assert_401(rejected(SETTINGS, auth("nope")))["message"]
    missing = assert_401(rejected(SETTINGS, auth(CHAT_KEY)))["message"]
    other = assert_401(rejected(SETTINGS, {**auth(PERSONAL_KEY), "x-user-id": "bob"}))["message"]
    assert len({unknown, missing, other}) == 3


def test_401_in_pt_br() -> None:
    pt = make_settings(language="pt-BR")
    en_text = assert_401(rejected(SETTINGS, auth("nope")))["message"]
    pt_text = assert_401(rejected(pt, auth("nope")))["message"]
    assert pt_text != en_text


# -- identify: bad user ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["u" * 257, "u" * 10_000, "bob\x00", "bob\x1b[31m", "a\nb", "tab\there"])
def test_overlong_or_non_printable_user_id_is_400(user: str) -> None:
    exc = rejected(SETTINGS, {**auth(CHAT_KEY), "x-user-id": user})
    assert exc.denial.status == 400
    error = error_of(exc.denial)
    assert error["type"] == "invalid_request_error"
    assert "x-user-id" in error["message"]


def test_user_id_of_256_printable_characters_is_fine() -> None:
    _, account = identify(SETTINGS, {**auth(CHAT_KEY), "x-user-id": "u" * 256})
    assert account.user_id == "u" * 256


def test_unicode_user_id_is_fine() -> None:
    _, account = identify(SETTINGS, {**auth(CHAT_KEY), "x-user-id": "joão@example.com.br"})
    assert account.user_id == "joão@example.com.br"


# -- quota_denial -----------------------------------------------------------------------------------------------


def balance(used: int, allowance: int = 1000, credits: int = 0, reserved: int = 0, suspended: bool = False) -> Balance:
    status = AccountStatus.SUSPENDED if suspended else AccountStatus.ACTIVE
    return Balance(
        user_id="bob",
        cycle="2026-11",
        resets_at=RESET,
        limits=AccountLimits(status, "small", allowance, 0.80, 0.95),
        allowance_used=used,
        credits=credits,
        reserved=reserved,
    )


def denied(b: Balance, verdict: Verdict = Verdict.DENY_QUOTA, estimate: int = 100) -> Decision:
    return Decision(verdict=verdict, balance=b, estimate=estimate, reserved=False)


NOW = RESET - timedelta(hours=10, seconds=0.5)


def test_quota_exhausted_is_429_insufficient_quota() -> None:
    denial = quota_denial(denied(balance(used=1000)), SETTINGS, NOW)
    assert denial.status == 429
    error = error_of(denial)
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "quota_exceeded"


def test_quota_denial_retry_after_is_seconds_to_reset() -> None:
    denial = quota_denial(denied(balance(used=1000)), SETTINGS, NOW)
    assert denial.headers["retry-after"] == str(10 * 3600 + 1)  # rounded up, never 0 before the reset
    exact = quota_denial(denied(balance(used=1000)), SETTINGS, RESET - timedelta(days=2))
    assert exact.headers["retry-after"] == str(2 * 86400)


def test_quota_denial_retry_after_is_at_least_one_second() -> None:
    denial = quota_denial(denied(balance(used=1000)), SETTINGS, RESET)
    assert int(denial.headers["retry-after"]) >= 1


def test_quota_denial_carries_the_x_quota_headers() -> None:
    denial = quota_denial(denied(balance(used=1000, reserved=0)), SETTINGS, NOW)
    h = denial.headers
    assert h["x-quota-state"] == "blocked"
    assert h["x-quota-limit"] == "1000"
    assert h["x-quota-remaining"] == "0"
    assert h["x-quota-used-percent"] == "100.0"
    assert h["x-quota-reset"] == "2026-12-01T03:00:00Z"


def test_quota_denial_quota_object() -> None:
    settings = make_settings(purchase_url="https://example.com/buy")
    error = error_of(quota_denial(denied(balance(used=1040)), settings, NOW))
    quota = error["quota"]
    assert quota["state"] == "blocked"
    assert quota["limit"] == 1000
    assert quota["used"] == 1040
    assert quota["remaining"] == 0
    assert quota["reset_at"] == "2026-12-01T03:00:00Z"
    assert quota["purchase_url"] == "https://example.com/buy"


def test_quota_denial_reset_at_parses_as_rfc3339_utc() -> None:
    error = error_of(quota_denial(denied(balance(used=1000)), SETTINGS, NOW))
    parsed = datetime.fromisoformat(error["quota"]["reset_at"].replace("Z", "+00:00"))
    assert parsed == RESET


def test_quota_denial_purchase_url_falls_back_to_the_credits_address() -> None:
    error = error_of(quota_denial(denied(balance(used=1000)), SETTINGS, NOW))
    assert error["quota"]["purchase_url"] == "mailto:creditos@example.com"
    assert "creditos@example.com" in error["message"]


def test_quota_exhausted_message_names_the_local_reset_date() -> None:
    error = error_of(quota_denial(denied(balance(used=1000)), SETTINGS, NOW))
    # the reset is 2026-12-01 00:00 in São Paulo, although 03:00 UTC
    assert "2026-12-01" in error["message"]


def test_strict_denial_with_tokens_left_says_how_many() -> None:
    strict = make_settings(admission_mode="strict")
    b = balance(used=900)  # 100 left, estimate 500
    denial = quota_denial(denied(b, estimate=500), strict, NOW)
    assert denial.status == 429
    error = error_of(denial)
    assert error["code"] == "quota_exceeded"
    assert error["quota"]["remaining"] == 100
    assert denial.headers["x-quota-remaining"] == "100"
    assert "100" in error["message"]
    exhausted = error_of(quota_denial(denied(balance(used=1000)), strict, NOW))["message"]
    assert error["message"] != exhausted


def test_quota_denial_with_credits_reserved_reports_zero_remaining() -> None:
    error = error_of(quota_denial(denied(balance(used=1000, credits=50, reserved=80)), SETTINGS, NOW))
    assert error["quota"]["remaining"] == 0


def test_quota_denial_has_no_warning_header() -> None:
    denial = quota_denial(denied(balance(used=1000)), SETTINGS, NOW)
    assert "x-token-warning" not in denial.headers


def test_suspended_is_403_permission_denied() -> None:
    decision = denied(balance(used=10, suspended=True), verdict=Verdict.DENY_SUSPENDED)
    denial = quota_denial(decision, SETTINGS, NOW)
    assert denial.status == 403
    error = error_of(denial)
    assert error["type"] == "permission_denied"
    assert error["code"] == "account_suspended"
    assert "creditos@example.com" in error["message"]
    assert "retry-after" not in denial.headers


def test_messages_in_pt_br_when_configured() -> None:
    pt = make_settings(language="pt-BR")
    en_quota = error_of(quota_denial(denied(balance(used=1000)), SETTINGS, NOW))
    pt_quota = error_of(quota_denial(denied(balance(used=1000)), pt, NOW))
    assert pt_quota["message"] != en_quota["message"]
    assert "01/12/2026" in pt_quota["message"]  # the Brazilian date of the local reset
    assert "creditos@example.com" in pt_quota["message"]
    # the machine-readable parts do not change with the language
    assert (pt_quota["type"], pt_quota["code"], pt_quota["quota"]) == (
        en_quota["type"],
        en_quota["code"],
        en_quota["quota"],
    )
    suspended = denied(balance(used=0, suspended=True), verdict=Verdict.DENY_SUSPENDED)
    en_susp = error_of(quota_denial(suspended, SETTINGS, NOW))["message"]
    pt_susp = error_of(quota_denial(suspended, pt, NOW))["message"]
    assert pt_susp != en_susp


def test_pt_br_body_is_utf8_json() -> None:
    pt = make_settings(language="pt-BR")
    denial = quota_denial(denied(balance(used=1000)), pt, NOW)
    text = denial.body.decode("utf-8")
    assert json.loads(text)["error"]["message"] == error_of(denial)["message"]


def test_long_purchase_url_keeps_the_message_short() -> None:
    settings = make_settings(purchase_url="https://example.com/" + "x" * 400)
    error = error_of(quota_denial(denied(balance(used=1000)), settings, NOW))
    assert len(error["message"]) <= MAX_MESSAGE_CHARS
