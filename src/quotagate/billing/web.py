"""The HTTP side of buying credits.

Through Envoy (under /v1/quota): the purchase page, which redirects to Stripe Checkout, and the pages Stripe
sends the buyer back to. On quotagate's own HTTP port only: `POST /webhooks/stripe`."""

from __future__ import annotations

import html
import logging
from urllib.parse import urlencode

from aiohttp import web

from quotagate.billing.events import stripe_id
from quotagate.billing.gateway import StripeUnavailable, package_name
from quotagate.billing.service import CANCELLED_PATH, DONE_PATH, BadEvent, Billing
from quotagate.config import Package
from quotagate.core.errors import InvalidRequest, NotFound
from quotagate.core.messages import Language
from quotagate.links import PURCHASE_PATH
from quotagate.web.identity import resolve_user

__all__ = ["WEBHOOK_PATH", "add_billing_routes"]

log = logging.getLogger("quotagate.billing")

WEBHOOK_PATH = "/webhooks/stripe"

_TEXT: dict[Language, dict[str, str]] = {
    Language.PT_BR: {
        "title": "Comprar créditos",
        "intro": "Escolha um pacote de tokens. O pagamento é feito pelo Stripe e os créditos entram na hora.",
        "buy": "Comprar",
        "none": "Nenhum pacote à venda no momento.",
        "off": "A compra por cartão não está disponível. Para comprar créditos: {manual}",
        "off_no_manual": "A compra por cartão não está disponível. Fale com o suporte.",
        "done_title": "Pagamento recebido",
        "done": "Obrigado! Seus créditos serão adicionados em instantes e você receberá um e-mail.",
        "cancelled_title": "Compra cancelada",
        "cancelled": "Nada foi cobrado. Você pode voltar ao link de compra quando quiser.",
        "no_package": "Pacote desconhecido ou fora de venda.",
        "stripe_down": "Não foi possível iniciar o pagamento agora. Tente de novo em alguns minutos.",
    },
    Language.EN: {
        "title": "Buy credits",
        "intro": "Choose a package of tokens. Stripe takes the payment and the credits are added at once.",
        "buy": "Buy",
        "none": "No package is on sale right now.",
        "off": "Buying by card is not available. To buy credits: {manual}",
        "off_no_manual": "Buying by card is not available. Please contact support.",
        "done_title": "Payment received",
        "done": "Thank you! Your credits will be added in a moment and you will get an e-mail.",
        "cancelled_title": "Purchase cancelled",
        "cancelled": "Nothing was charged. You can come back to the purchase link at any time.",
        "no_package": "Unknown package, or not on sale.",
        "stripe_down": "The payment could not be started right now. Please try again in a few minutes.",
    },
}


def format_price(package: Package, language: Language) -> str:
    whole, cents = divmod(package.price, 100)
    symbol = {"brl": "R$ ", "usd": "US$ ", "eur": "€ "}.get(package.currency, package.currency.upper() + " ")
    if language is Language.PT_BR:
        return f"{symbol}{whole:,}".replace(",", ".") + f",{cents:02d}"
    return f"{symbol}{whole:,}.{cents:02d}"


def _page(language: Language, title: str, body: str, status: int = 200) -> web.Response:
    lang = "pt-BR" if language is Language.PT_BR else "en"
    document = (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        '</head><body style="font-family: sans-serif; max-width: 36em; margin: 2em auto">'
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(status=status, text=document, content_type="text/html", charset="utf-8")


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _problem(request: web.Request, language: Language, status: int, kind: str, message: str) -> web.Response:
    """An error as JSON (API clients) or as a page (browsers)."""
    if _wants_html(request):
        return _page(language, _TEXT[language]["title"], f"<p>{html.escape(message)}</p>", status)
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


def add_billing_routes(app: web.Application, billing: Billing) -> None:
    service = billing.service
    settings = billing.settings
    language = settings.language
    text = _TEXT[language]

    async def purchase(request: web.Request) -> web.Response:
        if not billing.enabled:
            manual = settings.purchase_hint
            message = text["off"].format(manual=manual) if manual else text["off_no_manual"]
            return _problem(request, language, 404, "stripe_disabled", message)
        now = service.clock.now()
        user = resolve_user(request, settings, service.client_by_key, service.links.signer, now)
        if isinstance(user, web.Response):
            return user
        package_id = request.query.get("package", "").strip()
        if not package_id:
            token = request.query.get("t", "") if user.by_link else service.links.signer.token(user.user_id, now)
            return _package_list(billing.active_packages(), token, language)
        try:
            billing.package(package_id)
            # Only a trusted client's own credentials may create an account; a link names an existing one.
            account, _ = await service.balance_of(user.account, create=not user.by_link)
            session = await billing.start_checkout(account.user_id, account.email, package_id)
        except InvalidRequest:
            return _problem(request, language, 400, "invalid_package", text["no_package"])
        except NotFound:
            return _problem(request, language, 404, "not_found", "unknown user")
        except StripeUnavailable as exc:
            log.error("checkout could not start: %s", exc, extra={"user_id": user.user_id})
            return _problem(request, language, 502, "stripe_unavailable", text["stripe_down"])
        return web.Response(status=303, headers={"location": session.url, "cache-control": "no-store"})

    async def done(_: web.Request) -> web.Response:
        return _page(language, text["done_title"], f"<p>{html.escape(text['done'])}</p>")

    async def cancelled(_: web.Request) -> web.Response:
        return _page(language, text["cancelled_title"], f"<p>{html.escape(text['cancelled'])}</p>")

    async def webhook(request: web.Request) -> web.Response:
        payload = await request.read()
        try:
            event = billing.verify(payload, request.headers.get("stripe-signature", ""))
        except BadEvent as exc:
            log.warning("stripe webhook refused: %s", exc)
            return web.json_response({"error": {"message": f"bad webhook: {exc}", "type": "bad_signature"}}, status=400)
        # Both from the sender: only a Stripe-shaped id and a bounded type reach the log.
        event_id = stripe_id(event.get("id")) or "(no id)"
        kind = event.get("type")
        kind = kind[:100] if isinstance(kind, str) else "(no type)"
        try:
            result = await billing.handle(event)
        except Exception:
            # Only a fault of quotagate's own (PostgreSQL down): no event content gets here, since billing
            # refuses what it cannot credit with a 200. The 500 makes Stripe deliver the event again later.
            log.exception("stripe event %s (%s) failed", event_id, kind)
            return web.json_response({"error": {"message": "not processed; retry", "type": "internal"}}, status=500)
        log.info("stripe event %s (%s): %s", event_id, kind, result)
        return web.json_response({"received": True, "result": result})

    app.router.add_get(PURCHASE_PATH, purchase)
    app.router.add_get(DONE_PATH, done)
    app.router.add_get(CANCELLED_PATH, cancelled)
    app.router.add_post(WEBHOOK_PATH, webhook)


def _package_list(packages: list[Package], token: str, language: Language) -> web.Response:
    text = _TEXT[language]
    if not packages:
        return _page(language, text["title"], f"<p>{html.escape(text['none'])}</p>")
    items = "".join(
        f"<li><strong>{html.escape(package_name(p))}</strong> — {html.escape(format_price(p, language))} "
        f'<a href="{html.escape(PURCHASE_PATH + "?" + urlencode({"package": p.id, "t": token}))}">'
        f"{html.escape(text['buy'])}</a></li>"
        for p in packages
    )
    return _page(language, text["title"], f"<p>{html.escape(text['intro'])}</p><ul>{items}</ul>")
