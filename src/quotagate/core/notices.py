"""The notice a warned user reads inside the conversation, and the numbers written the way they read them.

Pure: the ext_proc adapter decides when a notice is due and where it goes; this says what it says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from quotagate.core.messages import Language, format_reset

__all__ = ["NoticeFacts", "buy_hint", "format_tokens", "notice_text"]

# Set apart from the answer: a rule (Markdown, as LibreChat renders it) and a warning sign.
SEPARATOR = "\n\n---\n"

_TEXTS: dict[Language, dict[str, str]] = {
    Language.PT_BR: {
        "warn": "⚠️ Você já usou {percent}% dos seus tokens deste mês: restam {remaining} até a renovação em {reset}.",
        "critical": (
            "⚠️ Seus tokens estão acabando: você já usou {percent}% dos tokens deste mês. "
            "Restam {remaining} até a renovação em {reset}."
        ),
        "buy_link": "Para comprar mais: {url}",
        "buy_email": "Para comprar mais, escreva para {email}.",
        "balance": "Seu saldo: {url}",
    },
    Language.EN: {
        "warn": "⚠️ You have used {percent}% of this month's tokens: {remaining} left until the reset on {reset}.",
        "critical": (
            "⚠️ You are running out of tokens: {percent}% of this month's tokens are used. "
            "{remaining} left until the reset on {reset}."
        ),
        "buy_link": "To buy more: {url}",
        "buy_email": "To buy more, write to {email}.",
        "balance": "Your balance: {url}",
    },
}


def format_tokens(count: int, language: Language) -> str:
    """1,234,567 in English, 1.234.567 in Portuguese."""
    text = f"{count:,}"
    return text.replace(",", ".") if language is Language.PT_BR else text


def buy_hint(purchase_url: str) -> tuple[str, str]:
    """("email", address) for the manual path's mailto:, ("url", link) for a page, ("", "") for nothing."""
    if purchase_url.startswith("mailto:"):
        return "email", purchase_url.removeprefix("mailto:")
    if purchase_url:
        return "url", purchase_url
    return "", ""


@dataclass(frozen=True)
class NoticeFacts:
    threshold: str  # warn or critical: which notice this is
    used_fraction: float
    remaining: int
    resets_at: datetime
    purchase_url: str
    balance_url: str


def notice_text(facts: NoticeFacts, language: Language, tz: ZoneInfo) -> str:
    """The notice, starting with its separator, so it can be appended to the answer as it is."""
    texts = _TEXTS[language]
    percent = min(999, math.floor(facts.used_fraction * 100))
    lines = [
        texts["critical" if facts.threshold == "critical" else "warn"].format(
            percent=percent,
            remaining=format_tokens(facts.remaining, language),
            reset=format_reset(facts.resets_at, tz, language),
        )
    ]
    kind, value = buy_hint(facts.purchase_url)
    if kind == "email":
        lines.append(texts["buy_email"].format(email=value))
    elif kind == "url":
        lines.append(texts["buy_link"].format(url=value))
    if facts.balance_url:
        lines.append(texts["balance"].format(url=facts.balance_url))
    # One Markdown paragraph per sentence group; two spaces + newline would be a soft break LibreChat may drop.
    return SEPARATOR + "\n\n".join(lines)
