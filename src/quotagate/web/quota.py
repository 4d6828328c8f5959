"""`GET /v1/quota`: the caller's own balance, for API clients and for people following their personal link."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from quotagate.adapters.openai_errors import rfc3339
from quotagate.core.errors import NotFound
from quotagate.core.model import Balance
from quotagate.links import BALANCE_PATH
from quotagate.service import QuotaService
from quotagate.store.ports import AccountRecord
from quotagate.web.identity import resolve_user

__all__ = ["add_quota_routes", "balance_json"]


def balance_json(account: AccountRecord, balance: Balance, purchase_url: str) -> dict[str, Any]:
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
    }


def add_quota_routes(app: web.Application, service: QuotaService) -> None:
    settings = service.settings
    links = service.links

    async def quota(request: web.Request) -> web.Response:
        now = service.clock.now()
        user = resolve_user(request, settings, service.client_by_key, links.signer, now)
        if isinstance(user, web.Response):
            return user
        try:
            # Only a trusted client's own credentials may create an account; a link names an existing one.
            account, balance = await service.balance_of(user.account, create=not user.by_link)
        except NotFound:
            return web.json_response({"error": {"message": "unknown user", "type": "not_found"}}, status=404)
        return web.json_response(balance_json(account, balance, links.purchase_url(user.user_id, now)))

    app.router.add_get(BALANCE_PATH, quota)
