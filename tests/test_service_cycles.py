"""The service over the real stores with an injected clock: calendar cycles, credits that carry over or
expire, weights in the charge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from harness import make_settings

from quotagate.core.clock import FixedClock
from quotagate.core.decide import Verdict
from quotagate.core.estimate import CompletionRequest
from quotagate.core.model import QuotaState
from quotagate.metrics import Metrics
from quotagate.service import QuotaService, UsageReport
from quotagate.store.ports import NewAccount
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import RedisHotState

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
# The last second of November in São Paulo.
LAST_SECOND = datetime(2026, 11, 30, 23, 59, 59, tzinfo=SAO_PAULO)
REQUEST = CompletionRequest(model="demo-small", prompt_chars=40, max_tokens=38, stream=False)  # 12 + 38 = 50


@pytest.fixture
async def service(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[QuotaService]:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        plans=[
            {
                "id": "small",
                "monthly_allowance": 1000,
                "model_weights": [{"pattern": "heavy-*", "input": 2.0, "output": 3.0}],
            }
        ],
    )
    box: list[QuotaService] = []
    ledger = await PostgresLedger.connect(settings.database_url, lambda a: box[0].limits_of(a))
    await ledger.migrate()
    await ledger.sync_plans(settings.plans)
    hot = RedisHotState.from_url(settings.redis_url, settings.redis_prefix)
    svc = QuotaService(settings, ledger, hot, FixedClock(LAST_SECOND.astimezone(UTC)), Metrics())
    box.append(svc)
    yield svc
    await hot.close()
    await ledger.close()


def clock_of(service: QuotaService) -> FixedClock:
    assert isinstance(service.clock, FixedClock)
    return service.clock


async def spend(service: QuotaService, user: str, request_id: str, tokens: int) -> None:
    decision = await service.check(NewAccount(user), request_id, REQUEST)
    assert decision.allowed
    await service.report_usage(UsageReport(request_id, user, "demo-small", tokens, 0))


async def test_allowance_resets_at_local_midnight_on_the_first_and_credits_carry_over(
    service: QuotaService, uid: str
) -> None:
    await service.check(NewAccount(uid), "r0", None)
    await service.grant(uid, 100, "Bought a package by e-mail.", None, "admin", "test")
    await spend(service, uid, "r1", 1050)  # the allowance and half the credits

    last = await service.check(NewAccount(uid), "r2", CompletionRequest("demo-small", 4, 60, False))
    assert last.allowed  # 50 credits left; default mode admits while anything is left
    await service.report_usage(UsageReport("r2", uid, "demo-small", 50, 0))
    denied = await service.check(NewAccount(uid), "r3", REQUEST)
    assert denied.verdict is Verdict.DENY_QUOTA
    assert denied.balance.resets_at == datetime(2026, 12, 1, 3, 0, tzinfo=UTC)

    clock_of(service).advance(1)  # 2026-12-01 00:00:00 in São Paulo: a new cycle
    fresh = await service.check(NewAccount(uid), "r4", REQUEST)
    assert fresh.allowed
    assert fresh.balance.cycle == "2026-12"
    assert fresh.balance.allowance_used == 0
    assert fresh.balance.credits == 0  # the credits were spent in November; unused ones would carry over
    assert fresh.state is QuotaState.NORMAL


async def test_unspent_credits_survive_the_reset(service: QuotaService, uid: str) -> None:
    await service.check(NewAccount(uid), "s0", None)
    await service.grant(uid, 400, "Bought a package by e-mail.", None, "admin", "test")
    await spend(service, uid, "s1", 900)
    clock_of(service).advance(1)
    _, balance = await service.account(uid)
    assert (balance.cycle, balance.allowance_used, balance.credits) == ("2026-12", 0, 400)


async def test_an_expired_grant_no_longer_counts(service: QuotaService, uid: str) -> None:
    clock = clock_of(service)
    clock.set(datetime(2026, 11, 10, 12, 0, tzinfo=UTC))
    await service.check(NewAccount(uid), "e0", None)
    expiry = clock.now() + timedelta(hours=1)
    await service.grant(uid, 500, "Trial credits for a week.", expiry, "admin", "test")
    await spend(service, uid, "e1", 1000)  # the allowance is gone; 500 credits left until the expiry
    assert (await service.check(NewAccount(uid), "e2", REQUEST)).allowed
    await service.report_usage(UsageReport("e2", uid, "demo-small", 100, 0))
    clock.advance(3600)  # the grant expires: the cached hot state must notice without being told
    after = await service.check(NewAccount(uid), "e3", REQUEST)
    assert after.verdict is Verdict.DENY_QUOTA
    assert after.balance.credits == 0


async def test_spend_draws_the_earliest_expiring_grant_first(service: QuotaService, uid: str) -> None:
    clock = clock_of(service)
    clock.set(datetime(2026, 11, 10, 12, 0, tzinfo=UTC))
    await service.check(NewAccount(uid), "g0", None)
    await service.grant(uid, 300, "These credits never expire.", None, "admin", "test")
    await service.grant(uid, 200, "These credits expire soon.", clock.now() + timedelta(days=2), "admin", "test")
    await spend(service, uid, "g1", 1250)  # 1000 allowance, then 200 of the expiring grant, then 50
    clock.advance(3 * 24 * 3600)
    _, balance = await service.account(uid)
    assert balance.credits == 250  # nothing was lost to the expiry: the expiring grant went first


async def test_weights_apply_to_the_charge(service: QuotaService, uid: str) -> None:
    await service.check(NewAccount(uid), "w0", None)
    outcome, balance = await service.report_usage(UsageReport("w1", uid, "heavy-model", 100, 10))
    assert outcome.cost == 230  # 100 x 2.0 + 10 x 3.0
    assert balance.allowance_used == 230


async def test_an_account_read_while_a_settlement_lands_never_misses_its_cost(
    service: QuotaService, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watched completion: its cost counted ahead in Redis (settling), not yet in the ledger.
    assert (await service.check(NewAccount(uid), "watched", REQUEST)).allowed
    assert await service.charge_ahead("watched", 30)
    # The settlement lands (ledger, then Redis) between the account's two reads, whichever comes second.
    reads: list[str] = []

    def landing_before_the_second_read(read: Any, name: str) -> Any:
        async def wrapped(*args: Any) -> Any:
            reads.append(name)
            if len(reads) == 2:
                await service.report_usage(UsageReport("watched", uid, "demo-small", 30, 0), in_flight=False)
            return await read(*args)

        return wrapped

    monkeypatch.setattr(service.hot, "view", landing_before_the_second_read(service.hot.view, "hot"))
    monkeypatch.setattr(service.ledger, "snapshot", landing_before_the_second_read(service.ledger.snapshot, "ledger"))
    _, balance = await service.account(uid)
    # Shown as used or as held (for a moment both), never as neither.
    assert balance.allowance_used + balance.reserved >= 30, reads
    monkeypatch.undo()
    _, settled = await service.account(uid)
    assert (settled.allowance_used, settled.reserved) == (30, 0)
