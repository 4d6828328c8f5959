"""Who is asking, for the HTTP endpoints served through Envoy.

Exactly as for chat requests (the client key plus, from trusted clients, `x-user-id`), so an API client or
LibreChat's backend can ask; or a personal signed link (`?t=`), so a person in a browser can.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from aiohttp import web

from quotagate.adapters.ext_authz import Rejected, identify
from quotagate.adapters.openai_errors import auth_denial
from quotagate.config import Client, Settings
from quotagate.core.messages import MessageKey
from quotagate.links import BadLink, LinkSigner
from quotagate.store.ports import NewAccount

__all__ = ["UserRequest", "resolve_user"]


class UserRequest:
    """The user a request speaks for, and whether it came with the client's own credentials."""

    def __init__(self, account: NewAccount, *, by_link: bool) -> None:
        self.account = account
        self.by_link = by_link

    @property
    def user_id(self) -> str:
        return self.account.user_id


def _reject(settings: Settings, key: MessageKey) -> web.Response:
    denial = auth_denial(settings, key)
    return web.Response(status=denial.status, body=denial.body, headers=denial.headers)


def resolve_user(
    request: web.Request,
    settings: Settings,
    lookup: Callable[[str], Client | None],
    links: LinkSigner,
    now: datetime,
) -> UserRequest | web.Response:
    """The user, or the 401 response to send instead."""
    headers: Mapping[str, str] = {k.lower(): v for k, v in request.headers.items()}
    if "authorization" in headers:
        try:
            _, account = identify(settings, headers, lookup)
        except Rejected as exc:
            denial = exc.denial
            return web.Response(status=denial.status, body=denial.body, headers=denial.headers)
        return UserRequest(account, by_link=False)
    token = request.query.get("t", "")
    if token:
        try:
            user_id = links.verify(token, now)
        except BadLink:
            return _reject(settings, MessageKey.BAD_LINK)
        return UserRequest(NewAccount(user_id=user_id, email="", name=""), by_link=True)
    return _reject(settings, MessageKey.INVALID_KEY)
