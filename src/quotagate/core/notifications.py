"""The e-mails a customer gets about their tokens: which kind a balance change calls for, and its text.

Pure: no I/O. The ledger enqueues a kind at most once per account and cycle; the sender renders it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from quotagate.core.messages import Language
from quotagate.core.model import AccountLimits, QuotaState, state_for_fraction


class NotificationKind(StrEnum):
    WARN = "warn"
    CRITICAL = "critical"
    BLOCKED = "blocked"
    CREDITS = "credits"
    RENEWED = "renewed"
    PAYMENT_FAILED = "payment_failed"


@dataclass(frozen=True)
class Email:
    subject: str
    body: str


_RANK = {QuotaState.NORMAL: 0, QuotaState.WARN: 1, QuotaState.CRITICAL: 2, QuotaState.BLOCKED: 3}
_KIND_OF = {
    QuotaState.WARN: NotificationKind.WARN,
    QuotaState.CRITICAL: NotificationKind.CRITICAL,
    QuotaState.BLOCKED: NotificationKind.BLOCKED,
}


def usage_state(limits: AccountLimits, allowance_used: int, credits: int) -> QuotaState:
    """The settled quota state (reservations aside; suspension is not a quota state here)."""
    if limits.allowance - allowance_used + credits <= 0:
        return QuotaState.BLOCKED
    fraction = 1.0 if limits.allowance <= 0 else allowance_used / limits.allowance
    return state_for_fraction(fraction, limits)


def crossed(before: QuotaState, after: QuotaState) -> NotificationKind | None:
    """The warning a charge calls for: the highest state reached, if it is above the one before."""
    if after in _KIND_OF and _RANK[after] > _RANK.get(before, 0):
        return _KIND_OF[after]
    return None


_SUBJECTS: dict[Language, dict[NotificationKind, str]] = {
    Language.PT_BR: {
        NotificationKind.WARN: "80% dos seus tokens foram utilizados",
        NotificationKind.CRITICAL: "URGENTE: 95% dos tokens utilizados",
        NotificationKind.BLOCKED: "Conta bloqueada - tokens esgotados",
        NotificationKind.CREDITS: "Créditos adicionados",
        NotificationKind.RENEWED: "Seus tokens mensais foram renovados",
        NotificationKind.PAYMENT_FAILED: "Pagamento não aprovado",
    },
    Language.EN: {
        NotificationKind.WARN: "80% of your tokens have been used",
        NotificationKind.CRITICAL: "URGENT: 95% of your tokens used",
        NotificationKind.BLOCKED: "Account blocked - tokens exhausted",
        NotificationKind.CREDITS: "Credits added",
        NotificationKind.RENEWED: "Your monthly tokens have been renewed",
        NotificationKind.PAYMENT_FAILED: "Payment declined",
    },
}

_BODIES: dict[Language, dict[NotificationKind, str]] = {
    Language.PT_BR: {
        NotificationKind.WARN: "Você já utilizou 80% dos tokens do ciclo {cycle}.{how}",
        NotificationKind.CRITICAL: "Você já utilizou 95% dos tokens do ciclo {cycle}. Evite o bloqueio.{how}",
        NotificationKind.BLOCKED: "Seus tokens do ciclo {cycle} acabaram e os pedidos estão bloqueados.{how}",
        NotificationKind.CREDITS: "Foram adicionados {amount} tokens em créditos à sua conta.",
        NotificationKind.RENEWED: "Seus tokens mensais foram renovados para o ciclo {cycle}.",
        NotificationKind.PAYMENT_FAILED: (
            "Seu pagamento de créditos não foi aprovado e nada foi cobrado. Tente novamente ou use outro cartão.{how}"
        ),
    },
    Language.EN: {
        NotificationKind.WARN: "You have used 80% of your tokens for cycle {cycle}.{how}",
        NotificationKind.CRITICAL: "You have used 95% of your tokens for cycle {cycle}. Avoid being blocked.{how}",
        NotificationKind.BLOCKED: "Your tokens for cycle {cycle} are used up and requests are blocked.{how}",
        NotificationKind.CREDITS: "{amount} tokens of credits have been added to your account.",
        NotificationKind.RENEWED: "Your monthly tokens have been renewed for cycle {cycle}.",
        NotificationKind.PAYMENT_FAILED: (
            "Your payment for credits was declined and nothing was charged. Try again or use another card.{how}"
        ),
    },
}

_HOW = {Language.PT_BR: " Para comprar mais créditos: {hint}", Language.EN: " To buy more credits: {hint}"}


def render(kind: NotificationKind, language: Language, name: str, cycle: str, amount: int, hint: str) -> Email:
    greeting = {Language.PT_BR: "Olá", Language.EN: "Hello"}[language]
    how = _HOW[language].format(hint=hint) if hint else ""
    text = _BODIES[language][kind].format(cycle=cycle, amount=amount, how=how)
    body = f"{greeting}{' ' + name if name else ''},\n\n{text}\n"
    return Email(subject=_SUBJECTS[language][kind], body=body)
