"""Delivers the notification outbox by SMTP, apart from the decision path (Check never waits for mail).

Delivery is at least once: a row is marked sent only after the SMTP server accepted the message, so a crash
between the two sends it again (after its lease ends); it is never lost. Rows of accounts with no e-mail are
marked skipped. A failure is retried with exponential backoff (attempts, next_attempt_at, last_error)."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage

from quotagate.config import Settings
from quotagate.core.notifications import render
from quotagate.store.postgres import PendingNotification, PostgresLedger

log = logging.getLogger("quotagate.notify")

BATCH = 50
SMTP_TIMEOUT_SECONDS = 30.0
# A claimed row is left alone this long by other senders; longer than one batch can take.
LEASE_SECONDS = 300.0


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
            except Exception:  # the sender must outlive a store hiccup; it retries next round
                log.exception("sending notifications failed")
            await asyncio.sleep(self._config.poll_seconds)
