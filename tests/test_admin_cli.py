"""`quotagate admin` as an operator runs it, against a real server with real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import pytest
from harness import ADMIN_TOKEN, make_settings

from quotagate.admin_cli import bar
from quotagate.server import Running, start
from quotagate.service import UsageReport


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Running]:
    running = await start(make_settings(database_url, redis_url, redis_prefix))
    yield running
    await running.stop()


async def admin(running: Running, *args: str, token: str | None = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QUOTAGATE_ADMIN_TOKEN"}
    if token is not None:
        env["QUOTAGATE_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "admin", "--server", f"127.0.0.1:{running.grpc_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_show_grant_suspend_activate(server: Running, uid: str) -> None:
    await server.service.report_usage(UsageReport("cli-1", uid, "demo-small", 600, 150))
    code, out, _ = await admin(server, "account", "show", uid)
    assert code == 0
    assert f"account    {uid}" in out
    assert "750 of 1,000 used" in out and "75.0%" in out
    assert bar(750, 1000) in out

    code, out, _ = await admin(server, "--json", "grant", uid, "500", "--reason", "Paid by bank transfer, ticket 17.")
    assert code == 0
    granted = json.loads(out)
    assert granted["balance"]["credits"] == "500" and int(granted["grant_id"]) > 0

    code, out, _ = await admin(server, "suspend", uid, "--reason", "Chargeback opened by the bank.")
    assert code == 0 and "status     suspended" in out
    code, out, _ = await admin(server, "--json", "activate", uid, "--reason", "Chargeback closed in our favour.")
    assert code == 0 and json.loads(out)["status"] == "active"

    audit = await server.service.ledger.audit_entries(uid)  # type: ignore[attr-defined]
    assert [(a["action"], a["reason"], a["actor"]) for a in audit[1:]] == [
        ("credits.grant", "Paid by bank transfer, ticket 17.", "env"),
        ("account.suspend", "Chargeback opened by the bank.", "env"),
        ("account.activate", "Chargeback closed in our favour.", "env"),
    ]


async def test_errors_are_one_line_with_exit_codes_scripts_can_rely_on(server: Running, uid: str) -> None:
    code, out, err = await admin(server, "account", "show", "nobody-" + uid)
    assert (code, out) == (5, "")
    assert err.startswith("quotagate admin: not_found:") and err.count("\n") == 1

    code, _, err = await admin(server, "account", "show", uid, token="wrong-token")
    assert code == 3 and "unauthenticated" in err

    code, _, err = await admin(server, "account", "show", uid, token=None)
    assert code == 3 and "QUOTAGATE_ADMIN_TOKEN" in err

    await server.service.report_usage(UsageReport("cli-2", uid, "demo-small", 1, 0))
    code, _, err = await admin(server, "grant", uid, "0", "--reason", "Nothing at all.")
    assert code == 2 and "amount" in err

    code, _, err = await admin(server, "grant", uid, "10", "--reason", "Promo.", "--expires", "2030-01-01T00:00:00")
    assert code == 2 and "timezone" in err
    assert (await server.service.account(uid))[1].credits == 0


def test_bar_shows_use_and_overdraft() -> None:
    assert bar(0, 100, 10) == "[..........]"
    assert bar(50, 100, 10) == "[#####.....]"
    assert bar(130, 100, 10) == "[##########]!"
    assert bar(1, 0, 4) == "[!!!!]"


async def test_lists_usage_ledger_audit_adjust_and_reset(server: Running, uid: str) -> None:
    service = server.service
    await service.report_usage(UsageReport("cli-a", uid, "demo-small", 100, 20))
    await service.report_usage(UsageReport("cli-b", uid, "demo-large", 30, 5))
    await service.grant(uid, 400, "Bought a package by e-mail.", None, "admin", "ops")

    code, out, _ = await admin(server, "accounts", "list", "--search", uid)
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split() == ["user", "plan", "state", "allowance", "used", "credits"]
    assert row.split()[0] == uid and "155/1,000" in row and row.split()[-1] == "400"

    code, out, _ = await admin(server, "usage", uid, "--by", "model")
    assert code == 0
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert lines["demo-small"] == ["1", "100", "20", "120"]
    assert lines["demo-large"] == ["1", "30", "5", "35"]
    assert lines["total"] == ["2", "130", "25", "155"]

    code, out, _ = await admin(server, "adjust", uid, "150", "--reason", "Refund of the unspent part.")
    assert code == 0 and "removed    150 credit tokens" in out and "credits    250" in out

    code, out, _ = await admin(server, "--json", "ledger", uid)
    assert code == 0
    kinds = [e["kind"] for e in json.loads(out)["entries"]]
    assert kinds[0] == "adjustment" and "grant" in kinds and kinds.count("usage") == 2

    code, out, err = await admin(server, "reset", uid, "--reason", "Billing error last week.")
    assert code == 0, err
    assert "0 of 1,000 used" in out

    code, out, _ = await admin(server, "audit", uid)
    assert code == 0
    actions = [line.split()[3] for line in out.splitlines()[1:]]
    assert actions[:3] == ["cycle.reset", "credits.adjust", "credits.grant"]


async def test_account_set_creates_changes_plan_and_allowance_and_is_audited(server: Running, uid: str) -> None:
    code, out, err = await admin(
        server, "account", "set", uid, "--email", "maria@example.com", "--name", "Maria",
        "--allowance", "5000", "--reason", "New customer, contract 42.",
    )  # fmt: skip
    assert code == 0, err
    assert f"account    {uid}  <maria@example.com>  Maria" in out
    assert "of 5,000 used" in out

    code, out, _ = await admin(
        server, "--json", "account", "set", uid, "--plan-allowance", "--reason", "The enterprise contract ended."
    )
    account = json.loads(out)
    assert code == 0 and account["balance"]["allowance"] == "1000" and account["email"] == "maria@example.com"

    code, _, err = await admin(server, "account", "set", uid, "--plan", "gold", "--reason", "Upgrade asked by e-mail.")
    assert code == 2 and "no plan 'gold'" in err

    audit = await server.service.ledger.audit_entries(uid)  # type: ignore[attr-defined]
    upserts = [a for a in audit if a["action"] == "account.upsert"]
    assert [a["reason"] for a in upserts] == ["New customer, contract 42.", "The enterprise contract ended."]
    assert json.loads(upserts[1]["before"])["allowance_override"] == 5000
    assert json.loads(upserts[1]["after"])["allowance_override"] is None
