from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from quotagate.links import BadLink, LinkSigner

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_round_trip_and_url() -> None:
    signer = LinkSigner(b"k", "https://chat.example.com/")
    url = signer.balance_url("ana@example.com", NOW)
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "chat.example.com" and parts.path == "/v1/quota"
    assert signer.verify(parse_qs(parts.query)["t"][0], NOW + timedelta(days=30)) == "ana@example.com"


def test_expiry_and_tampering() -> None:
    signer = LinkSigner(b"k", "http://x", ttl_seconds=60)
    token = signer.token("u1", NOW)
    # The expiry is rounded up to the hour, so the same link is handed out for an hour.
    assert token == signer.token("u1", NOW + timedelta(minutes=59))
    assert signer.verify(token, NOW + timedelta(seconds=3600)) == "u1"
    with pytest.raises(BadLink, match="expired"):
        signer.verify(token, NOW + timedelta(seconds=3601))
    _, expires, mac = token.split(".")
    other = LinkSigner(b"k", "http://x").token("u2", NOW).split(".")[0]
    with pytest.raises(BadLink, match="signature"):
        signer.verify(f"{other}.{expires}.{mac}", NOW)
    with pytest.raises(BadLink, match="signature"):
        LinkSigner(b"other", "http://x").verify(token, NOW)
    with pytest.raises(BadLink, match="malformed"):
        signer.verify("a.b", NOW)
