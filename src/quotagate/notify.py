"""Delivers the notification outbox by SMTP and by a signed HTTP webhook, apart from the decision path (Check
never waits for either).

Delivery is at least once: a row is marked sent only after the SMTP server accepted the message (or the webhook
answered 2xx), so a crash between the two sends it again (after its lease ends); it is never lost. Rows of
accounts with no e-mail are marked skipped. A failure is retried with exponential backoff. The two channels keep
their own status, attempts and next attempt, so a failing webhook never sends the e-mail again.

The webhook POSTs a JSON event with a stable `id` (receivers drop repeats) and the header
`x-quotagate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the shared secret>`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import smtplib
import time
from email.message import EmailMessage
from typing import Any

import aiohttp

from quotagate.config import Settings
from quotagate.core.notifications import render
from quotagate.stopping import stop_if_cancelled
from quotagate.store.postgres import PendingNotification, PostgresLedger, WebhookEvent

log = logging.getLogger("quotagate.notify")

BATCH = 50
SMTP_TIMEOUT_SECONDS = 30.0
# A claimed row is left alone this long by other senders; longer than one batch can take.
LEASE_SECONDS = 300.0
SIGNATURE_HEADER = "x-quotagate-signature"
EVENT_ID_HEADER = "x-quotagate-event-id"
# A receiver should refuse a signature older than this (replays).
SIGNATURE_TOLERANCE_SECONDS = 300


def backoff_seconds(attempts: int, base: float, ceiling: float) -> float:
    """The delay after the n-th failed attempt: base, 2 base, 4 base, ... up to ceiling."""
    return float(min(ceiling, base * 2 ** max(0, min(attempts - 1, 30))))


class NotificationSender:
    def __init__(self, ledger: PostgresLedger, settings: Settings) -> None:
        self._ledger = ledger
        self._settings = settings
        self._config = settings.notifications

    def _message(self, item: PendingNotification) -> EmailMessage:
        email = render(
            item.kind, self._settings.language, item.name, item.cycle, item.amount, self._settings.purchase_hint
        )
        message = EmailMessage()
        message["From"] = self._config.sender
        message["To"] = item.email
        message["Subject"] = email.subject
        message.set_content(email.body)
        return message

    def _send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self._config.smtp_host, self._config.smtp_port, timeout=SMTP_TIMEOUT_SECONDS) as smtp:
            smtp.send_message(message)

    async def send_due(self) -> int:
        """Sends what is due now; returns how many rows were sent or skipped."""
        done = 0
        for item in await self._ledger.claim_notifications(BATCH, LEASE_SECONDS):
            if not item.email:
                await self._ledger.finish_notification(item.id, "skipped")
                done += 1
                continue
            try:
                await asyncio.to_thread(self._send, self._message(item))
            except (OSError, smtplib.SMTPException) as exc:
                delay = backoff_seconds(item.attempts, self._config.retry_seconds, self._config.max_retry_seconds)
                log.warning("notification %d to %s failed (attempt %d): %s", item.id, item.user_id, item.attempts, exc)
                await self._ledger.retry_notification(item.id, f"{type(exc).__name__}: {exc}", delay)
                continue
            await self._ledger.finish_notification(item.id, "sent")
            done += 1
        return done

    async def run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception as exc:  # the sender must outlive a store hiccup; it retries next round
                stop_if_cancelled(exc)
                log.exception("sending notifications failed")
            stop_if_cancelled()
            await asyncio.sleep(self._config.poll_seconds)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """What a receiver checks: a v1 signature of this body by the secret, made within `tolerance` of now."""
    parts = dict(item.partition("=")[::2] for item in header.split(",") if "=" in item)
    stamp = parts.get("t", "")
    if not stamp.isdigit() or abs(now - int(stamp)) > tolerance:
        return False
    expected = sign(secret, int(stamp), body).partition(",v1=")[2]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookSender:
    """POSTs each outbox row to the configured URL as a signed JSON event, with retries."""

    def __init__(self, ledger: PostgresLedger, settings: Settings) -> None:
        self._ledger = ledger
        self._settings = settings
        self._config = settings.notifications

    def payload(self, event: WebhookEvent) -> dict[str, Any]:
        email = render(
            event.kind, self._settings.language, event.name, event.cycle, event.amount, self._settings.purchase_hint
        )
        return {
            "id": event.event_id,
            "type": event.kind.value,
            "user_id": event.user_id,
            "email": event.email,
            "name": event.name,
            "cycle": event.cycle,
            "amount": event.amount,
            "created_at": event.created_at.isoformat(),
            "message": {"language": self._settings.language.value, "subject": email.subject, "body": email.body},
        }

    async def _post(self, session: aiohttp.ClientSession, event: WebhookEvent) -> None:
        body = json.dumps(self.payload(event), ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(self._config.webhook_secret, int(time.time()), body),
            EVENT_ID_HEADER: event.event_id,
        }
        # A redirect counts as a failure like any other non-2xx: events go to the configured URL only.
        async with session.post(
            self._config.webhook_url, data=body, headers=headers, allow_redirects=False
        ) as response:
            if not 200 <= response.status < 300:
                raise WebhookRefused(f"HTTP {response.status}")

    async def send_due(self) -> int:
        """Delivers what is due now; returns how many events the receiver accepted."""
        events = await self._ledger.claim_webhooks(BATCH, LEASE_SECONDS)
        if not events:
            return 0
        done = 0
        timeout = aiohttp.ClientTimeout(total=self._config.webhook_timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for event in events:
                try:
                    await self._post(session, event)
                except (TimeoutError, aiohttp.ClientError, WebhookRefused) as exc:
                    delay = backoff_seconds(event.attempts, self._config.retry_seconds, self._config.max_retry_seconds)
                    error = str(exc) or type(exc).__name__
                    log.warning("webhook event %s failed (attempt %d): %s", event.event_id, event.attempts, error)
                    await self._ledger.retry_webhook(event.id, error, delay)
                    continue
                await self._ledger.finish_webhook(event.id)
                done += 1
        return done

    async def run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception as exc:  # the sender must outlive a store hiccup; it retries next round
                stop_if_cancelled(exc)
                log.exception("sending webhook events failed")
            stop_if_cancelled()
            await asyncio.sleep(self._config.poll_seconds)


class WebhookRefused(Exception):
    """The receiver answered, but not with 2xx."""
