"""`GET /v1/quota`: the caller's own balance, for API clients (JSON) and for people following their personal
link (HTML, when the client asks for it with `Accept: text/html` or `?format=html`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from quotagate.adapters.openai_errors import rfc3339
from quotagate.core.errors import NotFound
from quotagate.core.messages import Language
from quotagate.core.model import Balance
from quotagate.links import BALANCE_PATH
from quotagate.service import QuotaService
from quotagate.store.ports import AccountRecord
from quotagate.web.identity import resolve_user
from quotagate.web.page import PageFacts, error_page, how_to_open_page, render_balance_page

__all__ = ["add_quota_routes", "balance_json", "wants_html"]

# The page is personal: never cached, never framed, never sends its link (the token) on as a referrer.
_HTML_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "form-action 'none'; base-uri 'none'",
    "vary": "accept",
}


def balance_json(account: AccountRecord, balance: Balance, purchase_url: str, balance_url: str = "") -> dict[str, Any]:
    return {
        "user_id": account.user_id,
        "plan": account.plan_id,
        "state": balance.state.value,
        "allowance": balance.allowance,
        "used": balance.allowance_used,
        "credits": balance.credits,
        "reserved": balance.reserved,
        "remaining": balance.remaining,
        "percent": balance.used_percent,
        "reset_at": rfc3339(balance.resets_at),
        "purchase_url": purchase_url,
        "balance_url": balance_url,
    }


def wants_html(request: web.Request) -> bool:
    """`?format=` decides; otherwise a browser (text/html in Accept) gets the page and API clients JSON."""
    fmt = request.query.get("format", "").lower()
    if fmt in ("html", "json"):
        return fmt == "html"
    return "text/html" in request.headers.get("accept", "").lower()


def _language(request: web.Request, default: Language) -> Language:
    wanted = request.query.get("lang", "").strip().lower()
    for language in Language:
        if wanted in (language.value.lower(), language.value.split("-")[0].lower()):
            return language
    return default


def _as_html(refusal: web.Response, language: Language) -> web.Response:
    """A JSON refusal (401, 404) as a small page, for a person in a browser."""
    try:
        text = str(json.loads(refusal.text or "{}")["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = refusal.reason or "error"
    return web.Response(
        status=refusal.status, text=error_page(text, language), content_type="text/html", headers=_HTML_HEADERS
    )


def add_quota_routes(app: web.Application, service: QuotaService) -> None:
    settings = service.settings
    links = service.links

    async def quota(request: web.Request) -> web.Response:
        now = service.clock.now()
        html = wants_html(request)
        language = _language(request, settings.language)
        if html and "authorization" not in request.headers and not request.query.get("t"):
            page = how_to_open_page(language)
            return web.Response(status=401, text=page, content_type="text/html", headers=_HTML_HEADERS)
        user = resolve_user(request, settings, service.client_by_key, links.signer, now)
        if isinstance(user, web.Response):
            return _as_html(user, language) if html else user
        try:
            # Only a trusted client's own credentials may create an account; a link names an existing one.
            account, balance = await service.balance_of(user.account, create=not user.by_link)
        except NotFound:
            missing = web.json_response({"error": {"message": "unknown user", "type": "not_found"}}, status=404)
            return _as_html(missing, language) if html else missing
        purchase_url = links.purchase_url(user.user_id, now)
        if not html:
            body = balance_json(account, balance, purchase_url, links.balance_url(user.user_id, now))
            return web.json_response(body, headers={"vary": "accept", "cache-control": "no-store"})
        facts = PageFacts(
            user_id=account.user_id,
            plan=account.plan_id,
            state=balance.state,
            allowance=balance.allowance,
            used=balance.allowance_used,
            credits=balance.credits,
            reserved=balance.reserved,
            remaining=balance.remaining,
            percent=balance.used_percent,
            resets_at=balance.resets_at,
            purchase_url=purchase_url,
        )
        page = render_balance_page(facts, language, settings.timezone)
        return web.Response(text=page, content_type="text/html", headers=_HTML_HEADERS)

    app.router.add_get(BALANCE_PATH, quota)
