"""Personal links for people in a browser: the balance page and the purchase page.

A browser that follows a link from a chat message or an e-mail carries neither the client key nor
`x-user-id`, so the link itself says who it is for: the user id and an expiry, signed with HMAC-SHA256
under `link_secret`. Anyone holding the link sees that user's balance (like a password-reset link), so the
links expire and say nothing more than the user id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

__all__ = ["BALANCE_PATH", "PURCHASE_PATH", "BadLink", "LinkSigner", "UserLinks"]

BALANCE_PATH = "/v1/quota"
PURCHASE_PATH = "/v1/quota/purchase"
# Long enough to outlive a monthly cycle, so the link in a warning e-mail still works at the reset.
DEFAULT_LINK_TTL_SECONDS = 40 * 24 * 3600


class BadLink(ValueError):
    """The token is malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class LinkSigner:
    secret: bytes
    public_url: str
    ttl_seconds: int = DEFAULT_LINK_TTL_SECONDS

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, payload.encode(), hashlib.sha256).digest()[:20])

    def token(self, user_id: str, now: datetime) -> str:
        # Rounded up to the hour, so a user's link stays the same for an hour (and response headers repeat).
        expires = -(-(int(now.timestamp()) + self.ttl_seconds) // 3600) * 3600
        payload = f"{_b64(user_id.encode())}.{expires:x}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: datetime) -> str:
        """The user id the token was made for."""
        parts = token.split(".")
        if len(parts) != 3:
            raise BadLink("malformed link")
        payload = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(self._mac(payload), parts[2]):
            raise BadLink("link signature does not match")
        try:
            expires = int(parts[1], 16)
            user_id = _unb64(parts[0]).decode()
        except (ValueError, UnicodeDecodeError):
            raise BadLink("malformed link") from None
        if expires < now.timestamp():
            raise BadLink("link expired")
        return user_id

    def url(self, path: str, user_id: str, now: datetime, **params: str) -> str:
        query = urlencode({**params, "t": self.token(user_id, now)})
        return f"{self.public_url.rstrip('/')}{path}?{query}"

    def balance_url(self, user_id: str, now: datetime) -> str:
        return self.url(BALANCE_PATH, user_id, now)


@dataclass(frozen=True)
class UserLinks:
    """The links a user is shown: their balance page, and where to get more tokens."""

    signer: LinkSigner
    # Stripe Checkout is on: the personal purchase page. Off: the manual path (credits address or a fixed URL).
    checkout: bool
    manual: str

    def balance_url(self, user_id: str, now: datetime) -> str:
        return self.signer.url(BALANCE_PATH, user_id, now)

    def purchase_url(self, user_id: str, now: datetime) -> str:
        if self.checkout:
            return self.signer.url(PURCHASE_PATH, user_id, now)
        return self.manual
