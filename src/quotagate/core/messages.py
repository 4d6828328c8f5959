"""What a denied user reads. LibreChat shows `error.message` as is, so it is short, one line, and says what
to do next. Keep every text under 240 characters once filled in (tests/test_messages.py checks)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo


class Language(StrEnum):
    PT_BR = "pt-BR"
    EN = "en"


class MessageKey(StrEnum):
    QUOTA_EXHAUSTED = "quota_exhausted"
    QUOTA_INSUFFICIENT = "quota_insufficient"
    # The same without a link, for when the user's link would make the text too long for one line.
    QUOTA_EXHAUSTED_NO_LINK = "quota_exhausted_no_link"
    QUOTA_INSUFFICIENT_NO_LINK = "quota_insufficient_no_link"
    WRITE_TO = "write_to"
    ACCOUNT_SUSPENDED = "account_suspended"
    INVALID_KEY = "invalid_key"
    BAD_LINK = "bad_link"
    MISSING_USER = "missing_user"
    USER_NOT_ALLOWED = "user_not_allowed"
    INVALID_BODY = "invalid_body"
    RATE_LIMITED = "rate_limited"
    TOKENS_RATE_LIMITED = "tokens_rate_limited"


_TEXTS: dict[Language, dict[MessageKey, str]] = {
    Language.PT_BR: {
        MessageKey.QUOTA_EXHAUSTED: (
            "Seus tokens deste mês acabaram. Compre mais créditos ({how}) ou aguarde a renovação em {reset}."
        ),
        MessageKey.QUOTA_INSUFFICIENT: (
            "Saldo insuficiente para este pedido ({remaining} tokens restantes). "
            "Reduza o pedido, compre créditos ({how}) ou aguarde {reset}."
        ),
        MessageKey.QUOTA_EXHAUSTED_NO_LINK: (
            "Seus tokens deste mês acabaram. Compre mais créditos pelo link do seu saldo (no último aviso da "
            "conversa) ou aguarde a renovação em {reset}."
        ),
        MessageKey.QUOTA_INSUFFICIENT_NO_LINK: (
            "Saldo insuficiente para este pedido ({remaining} tokens restantes). Reduza o pedido, compre créditos "
            "pelo link do seu saldo (no último aviso da conversa) ou aguarde {reset}."
        ),
        MessageKey.WRITE_TO: "escreva para {how}",
        MessageKey.ACCOUNT_SUSPENDED: "Sua conta está suspensa. Fale com o suporte ({how}).",
        MessageKey.INVALID_KEY: "Chave de API ausente ou inválida.",
        MessageKey.BAD_LINK: "Este link é inválido ou expirou; abra o link mais recente que você recebeu.",
        MessageKey.MISSING_USER: "Usuário não informado: envie o cabeçalho x-user-id.",
        MessageKey.USER_NOT_ALLOWED: "Esta chave de API não pode agir em nome de outro usuário.",
        MessageKey.INVALID_BODY: "Pedido inválido: {detail}",
        MessageKey.RATE_LIMITED: "Muitas requisições em pouco tempo. Aguarde {seconds} s e tente novamente.",
        MessageKey.TOKENS_RATE_LIMITED: "Muitos tokens usados em pouco tempo. Aguarde {seconds} s e tente novamente.",
    },
    Language.EN: {
        MessageKey.QUOTA_EXHAUSTED: (
            "You have used all your tokens for this month. Buy more credits ({how}) or wait for the reset on {reset}."
        ),
        MessageKey.QUOTA_INSUFFICIENT: (
            "Not enough tokens left for this request ({remaining} left). Ask for less, buy credits ({how}) "
            "or wait until {reset}."
        ),
        MessageKey.QUOTA_EXHAUSTED_NO_LINK: (
            "You have used all your tokens for this month. Buy more credits from your balance link (in the latest "
            "notice in your chat) or wait for the reset on {reset}."
        ),
        MessageKey.QUOTA_INSUFFICIENT_NO_LINK: (
            "Not enough tokens left for this request ({remaining} left). Ask for less, buy credits from your "
            "balance link (in the latest notice in your chat) or wait until {reset}."
        ),
        MessageKey.WRITE_TO: "write to {how}",
        MessageKey.ACCOUNT_SUSPENDED: "Your account is suspended. Contact support ({how}).",
        MessageKey.INVALID_KEY: "Missing or invalid API key.",
        MessageKey.BAD_LINK: "This link is invalid or has expired; open the most recent link you received.",
        MessageKey.MISSING_USER: "No user given: send the x-user-id header.",
        MessageKey.USER_NOT_ALLOWED: "This API key may not act for another user.",
        MessageKey.INVALID_BODY: "Invalid request: {detail}",
        MessageKey.RATE_LIMITED: "Too many requests in a short time. Wait {seconds} s and try again.",
        MessageKey.TOKENS_RATE_LIMITED: "Too many tokens used in a short time. Wait {seconds} s and try again.",
    },
}

MAX_MESSAGE_CHARS = 240


def format_reset(at: datetime, tz: ZoneInfo, language: Language) -> str:
    local = at.astimezone(tz)
    if language is Language.PT_BR:
        return local.strftime("%d/%m/%Y %H:%M")
    return local.strftime("%Y-%m-%d %H:%M")


def _one_line(language: Language, key: MessageKey, values: dict[str, object]) -> str:
    return " ".join(_TEXTS[language][key].format(**values).split())  # one line, whatever was substituted


def message(language: Language, key: MessageKey, **values: object) -> str:
    text = _one_line(language, key, values)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


_NO_LINK = {
    MessageKey.QUOTA_EXHAUSTED: MessageKey.QUOTA_EXHAUSTED_NO_LINK,
    MessageKey.QUOTA_INSUFFICIENT: MessageKey.QUOTA_INSUFFICIENT_NO_LINK,
}


def quota_message(
    language: Language, key: MessageKey, *, reset: str, remaining: object, purchase_url: str, balance_url: str = ""
) -> str:
    """The blocked user's line, with the most useful next step that fits whole: the purchase link (or the
    credits address), else the shorter balance link, else the wording without a link. A link is never cut."""
    options: list[str] = []
    if purchase_url.startswith("mailto:"):
        options.append(_one_line(language, MessageKey.WRITE_TO, {"how": purchase_url.removeprefix("mailto:")}))
    elif purchase_url:
        options.append(purchase_url)
    if balance_url:
        options.append(balance_url)
    for how in options:
        text = _one_line(language, key, {"how": how, "reset": reset, "remaining": remaining})
        if len(text) <= MAX_MESSAGE_CHARS:
            return text
    return message(language, _NO_LINK.get(key, key), how="-", reset=reset, remaining=remaining)
