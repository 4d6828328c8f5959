"""The signed HTTP webhook for notifications: real PostgreSQL, Redis, a real local aiohttp receiver and, for
the independence of the two channels, a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import make_settings
from test_notifications import Inbox, Mail

from quotagate.config import ConfigError, load_settings, parse_settings
from quotagate.core.clock import FixedClock
from quotagate.core.estimate import CompletionRequest
from quotagate.notify import sign, verify
from quotagate.procs import free_port
from quotagate.server import Running, start
from quotagate.service import UsageReport
from quotagate.store.ports import NewAccount
from quotagate.store.postgres import PostgresLedger

NOVEMBER = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
REQUEST = CompletionRequest(model="demo-small", prompt_chars=40, max_tokens=10, stream=False)
SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Receiver:
    """A local webhook receiver: answers with the next status of `statuses` (200 when none is left)."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)  # (answer, headers, body)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append((status, {k.lower(): v for k, v in request.headers.items()}, body))
        return web.Response(status=status, text="ok" if status == 200 else "try later")

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for status, headers, body in self.received if status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver(port=free_port())
    app = web.Application()
    app.router.add_post("/hooks/quotagate", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hook.port).start()
    yield hook
    await runner.cleanup()


@pytest.fixture
def mail() -> Iterator[Mail]:
    server = Mail(Inbox(), free_port())
    server.start()
    yield server
    server.stop()


def notification_settings(receiver: Receiver, mail: Mail | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "enabled": True,
        "poll_seconds": 0.05,
        "retry_seconds": 0.2,
        "max_retry_seconds": 0.4,
        "webhook": {"url": f"http://127.0.0.1:{receiver.port}/hooks/quotagate", "secret": SECRET},
    }
    if mail is not None:
        config.update({"smtp_host": "127.0.0.1", "smtp_port": mail.port, "from": "quotas@example.com"})
    return config


async def serve(database_url: str, redis_url: str, redis_prefix: str, notifications: dict[str, Any]) -> Running:
    settings = make_settings(database_url, redis_url, redis_prefix, notifications=notifications)
    return await start(settings, clock=FixedClock(NOVEMBER))


async def spend(running: Running, user: str, tokens: int, address: str) -> None:
    request_id = f"{user}-{uuid.uuid4().hex[:12]}"
    decision = await running.service.check(NewAccount(user, address, "Ana"), request_id, REQUEST)
    assert decision.allowed
    await running.service.report_usage(UsageReport(request_id, user, "demo-small", tokens, 0))


async def outbox(running: Running, user: str) -> list[dict[str, Any]]:
    ledger = running.service.ledger
    assert isinstance(ledger, PostgresLedger)
    return await ledger.notifications_of(user)


async def until(condition: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def check_signature(headers: dict[str, str], body: bytes) -> None:
    """Verifies the signature as a receiver written from the README would, without quotagate's code."""
    fields = dict(part.split("=", 1) for part in headers["x-quotagate-signature"].split(","))
    assert abs(time.time() - int(fields["t"])) < 60
    expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)


async def test_crossing_80_percent_posts_one_signed_event(
    database_url: str, redis_url: str, redis_prefix: str, receiver: Receiver, uid: str
) -> None:
    running = await serve(database_url, redis_url, redis_prefix, notification_settings(receiver))
    try:
        address = f"{uid}@example.com"
        await spend(running, uid, 700, address)
        await spend(running, uid, 150, address)  # 850 of 1000: warn

        async def delivered() -> bool:
            rows = await outbox(running, uid)
            return bool(rows) and all(r["hook_status"] == "sent" for r in rows)

        await until(delivered)
        await spend(running, uid, 50, address)  # still warn: nothing new
        await asyncio.sleep(0.4)
        assert len(receiver.received) == 1
        headers, body = receiver.accepted()[0]
        check_signature(headers, body)
        assert verify(SECRET, headers["x-quotagate-signature"], body, time.time())
        assert not verify("another-secret-0123456789", headers["x-quotagate-signature"], body, time.time())
        assert not verify(SECRET, headers["x-quotagate-signature"], body + b" ", time.time())
        event = json.loads(body)
        (row,) = await outbox(running, uid)
        assert event["id"] == str(row["event_id"]) == headers["x-quotagate-event-id"]
        assert (event["type"], event["user_id"], event["email"], event["cycle"]) == ("warn", uid, address, "2026-11")
        assert event["message"]["subject"] == "80% of your tokens have been used"
        assert headers["content-type"] == "application/json"
        # No SMTP server is configured: the e-mail channel is off for this row, not pending forever.
        assert (row["status"], row["hook_attempts"]) == ("skipped", 1)
    finally:
        await running.stop()


async def test_a_failing_receiver_is_retried_until_it_accepts_and_the_mail_goes_once(
    database_url: str, redis_url: str, redis_prefix: str, receiver: Receiver, mail: Mail, uid: str
) -> None:
    receiver.statuses = [500, 503, 500]
    running = await serve(database_url, redis_url, redis_prefix, notification_settings(receiver, mail))
    try:
        address = f"{uid}@example.com"
        await spend(running, uid, 850, address)

        async def delivered() -> bool:
            rows = await outbox(running, uid)
            return bool(rows) and rows[0]["hook_status"] == "sent"

        await until(delivered)
        await asyncio.sleep(0.6)  # a few more polls: nothing else may arrive
        assert [status for status, _, _ in receiver.received] == [500, 503, 500, 200]
        ids = {headers["x-quotagate-event-id"] for _, headers, _ in receiver.received}
        bodies = {body for _, _, body in receiver.received}
        assert len(ids) == 1 and len(bodies) == 1  # the same event each time: receivers can drop repeats
        assert len(receiver.accepted()) == 1
        for _, headers, body in receiver.received:
            check_signature(headers, body)
        (row,) = await outbox(running, uid)
        assert (row["hook_attempts"], row["hook_sent_at"] is not None, row["hook_last_error"]) == (4, True, "")
        # The e-mail went once, on its own track, while the webhook kept failing.
        assert (row["status"], row["attempts"]) == ("sent", 1)
        assert mail.inbox.subjects(address) == ["80% of your tokens have been used"]
    finally:
        await running.stop()


def test_signatures_and_webhook_config() -> None:
    body = b'{"id":"x"}'
    header = sign(SECRET, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=") and len(header.partition("v1=")[2]) == 64
    assert verify(SECRET, header, body, 1_800_000_100)
    assert not verify(SECRET, header, body, 1_800_000_000 + 301)  # too old: a replay
    assert not verify(SECRET, "t=abc,v1=00", body, 1_800_000_000)
    hook = {"url": "https://hooks.example.com/quotagate", "secret": SECRET}
    settings = parse_settings({"notifications": {"enabled": True, "webhook": hook}}, "<test>", {})
    assert settings.notifications.webhook and not settings.notifications.mail
    assert SECRET not in repr(settings)
    from_env = parse_settings(
        {"notifications": {"enabled": True, "webhook": {"url": hook["url"]}}},
        "<test>",
        {"QUOTAGATE_WEBHOOK_SECRET": "x" * 20},
    )
    assert from_env.notifications.webhook_secret == "x" * 20


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("webhook_without_secret.yaml", "notifications.webhook.secret: required with a url: at least 16 characters"),
        ("webhook_bad_url.yaml", "notifications.webhook.url: must be an http:// or https:// URL"),
        ("unknown_webhook_key.yaml", "notifications.webhook.retries: unknown key"),
        ("notifications_without_channel.yaml", "notifications.smtp_host: required when notifications are enabled"),
    ],
)
def test_bad_webhook_config_names_file_and_key(name: str, error: str) -> None:
    path = Path(__file__).parent / "configs" / name
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value).startswith(f"{path}: {error}"), str(caught.value)
