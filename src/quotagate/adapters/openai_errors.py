"""OpenAI-style error bodies and the x-quota-* headers, as DESIGN.md's wire contract fixes them.

LibreChat shows `error.message` to the user, so every denial carries one in the configured language.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from quotagate.config import Settings
from quotagate.core.decide import Decision
from quotagate.core.messages import MessageKey, format_reset, message, quota_message
from quotagate.core.model import Balance, QuotaState


@dataclass(frozen=True)
class HttpDenial:
    status: int
    headers: dict[str, str]
    body: bytes


@functools.lru_cache(maxsize=64)
def rfc3339(at: datetime) -> str:
    # Cached: every Check of a cycle formats the same reset time.
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quota_headers(balance: Balance, state: QuotaState) -> dict[str, str]:
    headers = {
        "x-quota-state": state.value,
        "x-quota-limit": str(balance.allowance),
        "x-quota-remaining": str(balance.remaining),
        "x-quota-used-percent": f"{balance.used_percent:.1f}",
        "x-quota-reset": rfc3339(balance.resets_at),
    }
    if state in (QuotaState.WARN, QuotaState.CRITICAL):
        headers["x-token-warning"] = "true"
    return headers


def error_body(message_text: str, error_type: str, code: str, quota: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"message": message_text, "type": error_type, "code": code, "param": None}
    if quota is not None:
        error["quota"] = quota
    return json.dumps({"error": error}, ensure_ascii=False).encode()


def _quota_json(balance: Balance, state: QuotaState, purchase_url: str) -> dict[str, Any]:
    return {
        "state": state.value,
        "limit": balance.allowance,
        "used": balance.allowance_used,
        "credits": balance.credits,
        "remaining": balance.remaining,
        "reset_at": rfc3339(balance.resets_at),
        "purchase_url": purchase_url,
    }


def quota_denial(
    decision: Decision, settings: Settings, now: datetime, purchase_url: str | None = None, balance_url: str = ""
) -> HttpDenial:
    """The 429 (or 403 when suspended); `purchase_url` is the user's way to more tokens (default: the manual
    path from the settings), `balance_url` their balance page, named instead when the purchase link is too
    long for the one-line message."""
    if purchase_url is None:
        purchase_url = settings.purchase_hint
    balance = decision.balance
    how = purchase_url or "-"
    reset = format_reset(balance.resets_at, settings.timezone, settings.language)
    if decision.state is QuotaState.SUSPENDED:
        text = message(settings.language, MessageKey.ACCOUNT_SUSPENDED, how=settings.credits_email or how)
        body = error_body(text, "permission_denied", "account_suspended")
        return HttpDenial(403, {"content-type": "application/json"}, body)
    key = MessageKey.QUOTA_EXHAUSTED if balance.left <= 0 else MessageKey.QUOTA_INSUFFICIENT
    text = quota_message(
        settings.language,
        key,
        reset=reset,
        remaining=balance.remaining,
        purchase_url=purchase_url,
        balance_url=balance_url,
    )
    headers = {
        "content-type": "application/json",
        "retry-after": str(max(1, math.ceil((balance.resets_at - now).total_seconds()))),
        **quota_headers(balance, QuotaState.BLOCKED),
    }
    quota = _quota_json(balance, QuotaState.BLOCKED, purchase_url)
    body = error_body(text, "insufficient_quota", "quota_exceeded", quota)
    return HttpDenial(429, headers, body)


def auth_denial(settings: Settings, key: MessageKey) -> HttpDenial:
    body = error_body(message(settings.language, key), "invalid_request_error", "invalid_api_key")
    return HttpDenial(401, {"content-type": "application/json"}, body)


def invalid_request(settings: Settings, detail: str) -> HttpDenial:
    text = message(settings.language, MessageKey.INVALID_BODY, detail=detail)
    return HttpDenial(
        400, {"content-type": "application/json"}, error_body(text, "invalid_request_error", "invalid_body")
    )
