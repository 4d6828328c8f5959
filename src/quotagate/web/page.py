"""The balance page a person sees: one self-contained HTML document (inline CSS, no scripts, no external assets).

Pure: it gets the figures and links and returns text; every value that reaches the page goes through
html.escape.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from quotagate.core.messages import Language, format_reset
from quotagate.core.model import QuotaState
from quotagate.core.notices import buy_hint, format_tokens

__all__ = ["STATE_COLOURS", "PageFacts", "error_page", "how_to_open_page", "render_balance_page"]

# The bar's colour per state; used nowhere else on the page (the screenshot test finds the bar by it).
STATE_COLOURS: dict[QuotaState, str] = {
    QuotaState.NORMAL: "#2e7d32",
    QuotaState.WARN: "#f9a825",
    QuotaState.CRITICAL: "#ef6c00",
    QuotaState.BLOCKED: "#c62828",
    QuotaState.SUSPENDED: "#757575",
}
TRACK_COLOUR = "#e3e6ea"

_TEXTS: dict[Language, dict[str, str]] = {
    Language.PT_BR: {
        "title": "Seu saldo de tokens",
        "plan": "plano",
        "normal": "Tudo certo",
        "warn": "Atenção: a maior parte dos seus tokens do mês já foi usada",
        "critical": "Seus tokens estão acabando",
        "blocked": "Seus tokens acabaram",
        "suspended": "Conta suspensa",
        "used_of": "{percent}% da franquia mensal usada",
        "used": "Usados",
        "of": "de",
        "credits": "Créditos extras",
        "reserved": "Em uso agora",
        "remaining": "Disponível",
        "reset": "Renovação",
        "blocked_text": "Novos pedidos voltam a ser atendidos com mais créditos ou na renovação.",
        "suspended_text": "Sua conta está suspensa. Fale com o suporte.",
        "buy": "Comprar mais tokens",
        "write": "Para comprar mais tokens, escreva para",
        "contact": "Suporte:",
        "how_to_open": (
            "Esta página mostra o seu saldo quando aberta pelo seu link pessoal. Ele vem no aviso da conversa "
            "(aos 80% e aos 95% de uso) e na mensagem de quando os tokens acabam."
        ),
    },
    Language.EN: {
        "title": "Your token balance",
        "plan": "plan",
        "normal": "All good",
        "warn": "Heads up: most of this month's tokens are used",
        "critical": "You are running out of tokens",
        "blocked": "You have no tokens left",
        "suspended": "Account suspended",
        "used_of": "{percent}% of the monthly allowance used",
        "used": "Used",
        "of": "of",
        "credits": "Extra credits",
        "reserved": "In use right now",
        "remaining": "Available",
        "reset": "Resets",
        "blocked_text": "New requests are served again with more credits or at the reset.",
        "suspended_text": "Your account is suspended. Please contact support.",
        "buy": "Buy more tokens",
        "write": "To buy more tokens, write to",
        "contact": "Support:",
        "how_to_open": (
            "This page shows your balance when you open it from your personal link. The link comes in the notice "
            "in your chat (at 80% and 95% of use) and in the message when your tokens run out."
        ),
    },
}

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2328;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:640px;margin:32px auto;padding:28px 32px;background:#fff;border-radius:12px;
box-shadow:0 1px 3px rgba(0,0,0,.12)}
h1{margin:0 0 4px;font-size:24px}
.who{margin:0 0 20px;color:#59636e;font-size:14px;overflow-wrap:anywhere}
.status{margin:0 0 12px;font-weight:600}
.bar{height:28px;background:%(track)s;border-radius:6px;overflow:hidden}
.fill{height:100%%;background:%(fill)s}
.bar-label{margin:6px 0 20px;color:#59636e;font-size:14px}
dl{display:grid;grid-template-columns:auto 1fr;gap:6px 24px;margin:0 0 24px}
dt{color:#59636e}dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.note{margin:0 0 16px}
.button{display:inline-block;padding:10px 20px;background:#1565c0;color:#fff;border-radius:8px;
text-decoration:none;font-weight:600}
a{color:#1565c0}
"""


@dataclass(frozen=True)
class PageFacts:
    user_id: str
    plan: str
    state: QuotaState
    allowance: int
    used: int
    credits: int
    reserved: int
    remaining: int
    percent: float  # of the allowance used, one decimal
    resets_at: datetime
    purchase_url: str


def _number(value: int, language: Language) -> str:
    return html.escape(format_tokens(value, language))


def _percent(value: float, language: Language) -> str:
    text = f"{value:.1f}"
    return text.replace(".", ",") if language is Language.PT_BR else text


def _action(facts: PageFacts, texts: dict[str, str]) -> str:
    """The way to more tokens: a button for a page, the address for the credits e-mail."""
    kind, value = buy_hint(facts.purchase_url)
    if facts.state is QuotaState.SUSPENDED:
        if kind != "email":
            return ""
        address = html.escape(value)
        return f'<p class="note">{texts["contact"]} <a href="mailto:{address}">{address}</a></p>'
    if kind == "email":
        address = html.escape(value)
        return f'<p class="note">{texts["write"]} <a href="mailto:{address}">{address}</a>.</p>'
    if kind == "url" and value.startswith(("https://", "http://")):
        return f'<p><a class="button" href="{html.escape(value, quote=True)}">{texts["buy"]}</a></p>'
    return ""


def _document(language: Language, title: str, fill: str, body: str) -> str:
    css = _CSS % {"track": TRACK_COLOUR, "fill": fill}
    return (
        f'<!doctype html>\n<html lang="{language.value}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n<main>\n{body}</main>\n"
        "</body>\n</html>\n"
    )


def render_balance_page(facts: PageFacts, language: Language, tz: ZoneInfo) -> str:
    texts = _TEXTS[language]
    state = facts.state
    width = max(0.0, min(100.0, facts.percent))
    notes = {QuotaState.BLOCKED: "blocked_text", QuotaState.SUSPENDED: "suspended_text"}
    note = f'<p class="note">{texts[notes[state]]}</p>\n' if state in notes else ""
    reset = html.escape(f"{format_reset(facts.resets_at, tz, language)} ({tz.key})")
    body = (
        f"<h1>{texts['title']}</h1>\n"
        f'<p class="who">{html.escape(facts.user_id)} · {texts["plan"]} {html.escape(facts.plan)}</p>\n'
        f'<p class="status" data-state="{state.value}">{texts[state.value]}</p>\n'
        f'<div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="{width:.1f}">'
        f'<div class="fill" style="width:{width:.1f}%"></div></div>\n'
        f'<p class="bar-label">{texts["used_of"].format(percent=_percent(facts.percent, language))}</p>\n'
        "<dl>\n"
        f"<dt>{texts['used']}</dt><dd>{_number(facts.used, language)} {texts['of']} "
        f"{_number(facts.allowance, language)}</dd>\n"
        f"<dt>{texts['credits']}</dt><dd>{_number(facts.credits, language)}</dd>\n"
        f"<dt>{texts['reserved']}</dt><dd>{_number(facts.reserved, language)}</dd>\n"
        f"<dt>{texts['remaining']}</dt><dd>{_number(facts.remaining, language)}</dd>\n"
        f"<dt>{texts['reset']}</dt><dd>{reset}</dd>\n"
        "</dl>\n"
        f"{note}{_action(facts, texts)}\n"
    )
    return _document(language, texts["title"], STATE_COLOURS[state], body)


def error_page(message: str, language: Language) -> str:
    """A refused link or an unknown user, for a person in a browser."""
    title = _TEXTS[language]["title"]
    return _document(language, title, TRACK_COLOUR, f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(message)}</p>\n")


def how_to_open_page(language: Language) -> str:
    """For a person who opened the page without their link (from a static link in the chat UI, say)."""
    return error_page(_TEXTS[language]["how_to_open"], language)
