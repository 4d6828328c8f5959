"""Customer e-mails through the outbox: real PostgreSQL, Redis and a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from harness import make_settings

from quotagate.core.clock import FixedClock
from quotagate.core.estimate import CompletionRequest
from quotagate.core.messages import Language
from quotagate.core.model import QuotaState
from quotagate.core.notifications import NotificationKind, crossed, render
from quotagate.procs import free_port
from quotagate.server import Running, start
from quotagate.service import UsageReport
from quotagate.store.ports import NewAccount
from quotagate.store.postgres import PostgresLedger, previous_cycle

NOVEMBER = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
REQUEST = CompletionRequest(model="demo-small", prompt_chars=40, max_tokens=10, stream=False)


class Inbox:
    """An aiosmtpd handler that keeps what it accepted."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def to(self, address: str) -> list[email.message.EmailMessage]:
        return [m for m in self.messages if m["To"] == address]

    def subjects(self, address: str) -> list[str]:
        return [str(m["Subject"]) for m in self.to(address)]


@dataclass
class Mail:
    inbox: Inbox
    port: int
    controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def mail() -> Iterator[Mail]:
    server = Mail(Inbox(), free_port())
    server.start()
    yield server
    server.stop()


def smtp_notifications(mail: Mail) -> dict[str, Any]:
    """The notifications section for the local SMTP server, polled and retried quickly."""
    return {
        "enabled": True,
        "smtp_host": "127.0.0.1",
        "smtp_port": mail.port,
        "from": "quotas@example.com",
        "poll_seconds": 0.05,
        "retry_seconds": 0.2,
        "max_retry_seconds": 0.5,
    }


@pytest.fixture
async def running(database_url: str, redis_url: str, redis_prefix: str, mail: Mail) -> AsyncIterator[Running]:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        language="pt-BR",
        notifications=smtp_notifications(mail),
    )
    started = await start(settings, clock=FixedClock(NOVEMBER))
    yield started
    await started.stop()


def ledger_of(running: Running) -> PostgresLedger:
    ledger = running.service.ledger
    assert isinstance(ledger, PostgresLedger)
    return ledger


async def spend(running: Running, user: str, tokens: int, address: str = "") -> None:
    request_id = f"{user}-{uuid.uuid4().hex[:12]}"
    decision = await running.service.check(NewAccount(user, address, "Ana"), request_id, REQUEST)
    assert decision.allowed
    await running.service.report_usage(UsageReport(request_id, user, "demo-small", tokens, 0))


async def settled(running: Running, user: str, within: float = 10.0) -> list[dict[str, Any]]:
    """The user's outbox once nothing is pending any more."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        rows = await ledger_of(running).notifications_of(user)
        if all(r["status"] != "pending" for r in rows):
            return rows
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"notifications still pending: {rows}")
        await asyncio.sleep(0.05)


async def test_crossing_80_percent_sends_one_mail_and_more_warn_usage_sends_none(
    running: Running, mail: Mail, uid: str
) -> None:
    address = f"{uid}@example.com"
    await spend(running, uid, 700, address)
    assert await settled(running, uid) == []
    await spend(running, uid, 150, address)  # 850 of 1000: warn
    rows = await settled(running, uid)
    assert [(r["kind"], r["status"], r["cycle"]) for r in rows] == [("warn", "sent", "2026-11")]
    assert mail.inbox.subjects(address) == ["80% dos seus tokens foram utilizados"]
    message = mail.inbox.to(address)[0]
    assert message["From"] == "quotas@example.com"
    assert "Olá Ana" in message.get_content()
    await spend(running, uid, 50, address)  # 900: still warn
    await settled(running, uid)
    await asyncio.sleep(0.3)
    assert mail.inbox.subjects(address) == ["80% dos seus tokens foram utilizados"]


async def test_critical_and_blocked_send_theirs_once(running: Running, mail: Mail, uid: str) -> None:
    address = f"{uid}@example.com"
    await spend(running, uid, 960, address)  # straight to critical: only the highest state is mailed
    await settled(running, uid)
    assert mail.inbox.subjects(address) == ["URGENTE: 95% dos tokens utilizados"]
    await spend(running, uid, 40, address)  # 1000: blocked
    rows = await settled(running, uid)
    assert [r["kind"] for r in rows] == ["critical", "blocked"]
    assert mail.inbox.subjects(address) == [
        "URGENTE: 95% dos tokens utilizados",
        "Conta bloqueada - tokens esgotados",
    ]


async def test_a_grant_sends_credits_added(running: Running, mail: Mail, uid: str) -> None:
    address = f"{uid}@example.com"
    await running.service.check(NewAccount(uid, address, "Ana"), f"{uid}-r0", None)
    await running.service.grant(uid, 250, "Bought a package by e-mail.", None, "admin", "test")
    rows = await settled(running, uid)
    assert [(r["kind"], r["amount"], r["status"]) for r in rows] == [("credits", 250, "sent")]
    assert mail.inbox.subjects(address) == ["Créditos adicionados"]
    assert "250" in mail.inbox.to(address)[0].get_content()


async def test_first_charge_of_a_new_cycle_sends_renewed(running: Running, mail: Mail, uid: str) -> None:
    address = f"{uid}@example.com"
    await spend(running, uid, 100, address)
    assert await settled(running, uid) == []
    clock = running.service.clock
    assert isinstance(clock, FixedClock)
    clock.set(DECEMBER)
    await spend(running, uid, 100, address)
    await spend(running, uid, 100, address)
    rows = await settled(running, uid)
    assert [(r["kind"], r["cycle"]) for r in rows] == [("renewed", "2026-12")]
    assert mail.inbox.subjects(address) == ["Seus tokens mensais foram renovados"]


async def test_an_account_without_email_is_skipped(running: Running, mail: Mail, uid: str) -> None:
    await spend(running, uid, 850)
    rows = await settled(running, uid)
    assert [(r["kind"], r["status"]) for r in rows] == [("warn", "skipped")]
    assert mail.inbox.to("") == []


async def test_smtp_down_is_retried_and_arrives_exactly_once(running: Running, mail: Mail, uid: str) -> None:
    address = f"{uid}@example.com"
    mail.stop()
    await spend(running, uid, 850, address)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        rows = await ledger_of(running).notifications_of(uid)
        if rows and rows[0]["attempts"] >= 2:
            break
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.05)
    assert rows[0]["status"] == "pending"
    assert rows[0]["last_error"]
    assert mail.inbox.to(address) == []
    mail.start()  # the same port again
    rows = await settled(running, uid)
    assert rows[0]["status"] == "sent" and rows[0]["sent_at"] is not None
    await asyncio.sleep(0.5)
    assert mail.inbox.subjects(address) == ["80% dos seus tokens foram utilizados"]


def test_templates_and_crossings() -> None:
    assert crossed(QuotaState.NORMAL, QuotaState.WARN) is NotificationKind.WARN
    assert crossed(QuotaState.WARN, QuotaState.WARN) is None
    assert crossed(QuotaState.NORMAL, QuotaState.BLOCKED) is NotificationKind.BLOCKED
    assert crossed(QuotaState.CRITICAL, QuotaState.WARN) is None
    english = render(NotificationKind.RENEWED, Language.EN, "", "2026-12", 0, "")
    assert english.subject == "Your monthly tokens have been renewed"
    assert previous_cycle("2027-01") == "2026-12" and previous_cycle("2026-11") == "2026-10"


async def test_warn_again_after_a_grant_sends_nothing_and_a_new_cycle_sends_again(
    running: Running, mail: Mail, uid: str
) -> None:
    address = f"{uid}@example.com"
    warn_subject = "80% dos seus tokens foram utilizados"
    await spend(running, uid, 850, address)  # 85% of the allowance: warn
    await settled(running, uid)
    assert mail.inbox.subjects(address) == [warn_subject]
    await running.service.grant(uid, 500, "A grant so the user can keep working.", None, "admin", "test")
    await spend(running, uid, 60, address)  # new usage, still past 80% in the same cycle
    rows = await settled(running, uid)
    assert sorted(r["kind"] for r in rows) == ["credits", "warn"]
    await asyncio.sleep(0.3)
    assert sorted(mail.inbox.subjects(address)) == sorted([warn_subject, "Créditos adicionados"])

    clock = running.service.clock
    assert isinstance(clock, FixedClock)
    clock.set(DECEMBER)
    await spend(running, uid, 850, address)  # the new cycle's allowance crosses 80% again
    rows = await settled(running, uid)
    assert sorted((r["kind"], r["cycle"]) for r in rows if r["cycle"] == "2026-12") == [
        ("renewed", "2026-12"),
        ("warn", "2026-12"),
    ]
    assert mail.inbox.subjects(address).count(warn_subject) == 2
