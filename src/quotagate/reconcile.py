"""`quotagate reconcile`: each account's Redis hot state against the PostgreSQL ledger, and the repair.

Redis caches, per account and cycle, the ledger's figures (status, plan, allowance, thresholds, allowance
used, credits) plus what only Redis knows: the tokens held by reservations in flight and by usage waiting in
the outbox. Drift is any cached figure that differs from the ledger, or a held sum that differs from the
reservations and outbox records actually there. Balances not in Redis are not drift: Check loads them from
the ledger on first use.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from quotagate.config import Settings
from quotagate.core.clock import SystemClock
from quotagate.core.errors import NotFound, StoreUnavailable
from quotagate.core.model import LedgerSnapshot
from quotagate.metrics import Metrics
from quotagate.outbox import UsageOutbox
from quotagate.service import QuotaService
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import BALANCE_TTL_MS, RedisHotState, _script, snapshot_fields

# A balance seen drifting is looked at again after this pause before it is reported: a settlement commits to
# PostgreSQL a moment before it reaches Redis, and that moment is not drift.
RECHECK_SECONDS = 0.3
REPAIR_ATTEMPTS = 3


@dataclass(frozen=True)
class FieldDrift:
    field: str
    redis: str
    ledger: str


@dataclass(frozen=True)
class AccountDrift:
    user_id: str
    fields: tuple[FieldDrift, ...]


@dataclass
class Holds:
    """Per user, what Redis should hold besides the ledger's figures."""

    reserved: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    settling: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    pending: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class ReconcileReport:
    cycle: str
    checked: int = 0
    drift: list[AccountDrift] = field(default_factory=list)
    repaired: int = 0
    outbox: int = 0
    reservations: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle,
            "checked": self.checked,
            "drift": [
                {"user_id": d.user_id, "fields": {f.field: {"redis": f.redis, "ledger": f.ledger} for f in d.fields}}
                for d in self.drift
            ],
            "repaired": self.repaired,
            "outbox": self.outbox,
            "reservations": self.reservations,
        }

    def table(self) -> str:
        lines = [
            f"cycle {self.cycle}: {self.checked} balances in Redis checked against the ledger, "
            f"{len(self.drift)} with drift; {self.reservations} reservations in flight, "
            f"{self.outbox} usage records waiting in the outbox"
        ]
        if self.drift:
            rows = [("account", "field", "redis", "ledger")]
            rows += [(d.user_id, f.field, f.redis, f.ledger) for d in self.drift for f in d.fields]
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
        if self.repaired:
            lines.append(f"repaired {self.repaired} balances from the ledger")
        return "\n".join(lines)


class Reconciler:
    def __init__(self, service: QuotaService, hot: RedisHotState, outbox: UsageOutbox, prefix: str) -> None:
        self._service = service
        self._hot = hot
        self._outbox = outbox
        self._prefix = prefix
        self._r = hot.client
        self._repair = self._r.register_script(_script("repair.lua"))

    async def run(self, repair: bool = False) -> ReconcileReport:
        now = self._service.clock.now()
        cycle = self._service.cycle(now).key
        report = ReconcileReport(cycle)
        suffix = f":{cycle}"
        start = f"{self._prefix}bal:"
        users = [
            key[len(start) : -len(suffix)]
            async for key in self._r.scan_iter(match=f"{start}*{suffix}", count=1000)
            if key.endswith(suffix)
        ]
        report.checked = len(users)
        drifting = await self._compare_all(users, cycle)
        if drifting:
            await asyncio.sleep(RECHECK_SECONDS)
            drifting = await self._compare_all([d.user_id for d in drifting], cycle)
        report.drift = sorted(drifting, key=lambda d: d.user_id)
        if repair:
            for drift in report.drift:
                await self._repair_one(drift.user_id, cycle)
                report.repaired += 1
        report.outbox = await self._outbox.size()
        report.reservations = int(await self._r.zcard(f"{self._prefix}res:due"))
        return report

    async def _holds(self, cycle: str) -> Holds:
        """Per user: the tokens held by live reservations, the costs settling in their place, and the tokens
        held by outbox records, in `cycle`."""
        ids = await self._r.zrange(f"{self._prefix}res:due", 0, -1)
        holds = Holds()
        if ids:
            pipe = self._r.pipeline(transaction=False)
            for request_id in ids:
                pipe.hmget(f"{self._prefix}res:{request_id!s}", ["user", "cycle", "estimate", "settling"])
            for user, res_cycle, estimate, settling in await pipe.execute():
                if user is None or res_cycle != cycle:
                    continue
                if settling is not None:
                    holds.settling[user] += int(settling)
                else:
                    holds.reserved[user] += int(estimate)
        for item in await self._outbox.all():
            if item.cycle == cycle:
                holds.pending[item.usage.user_id] += item.held
        return holds

    async def _compare_all(self, users: list[str], cycle: str) -> list[AccountDrift]:
        holds = await self._holds(cycle)
        found = await asyncio.gather(*(self._compare(u, cycle, holds) for u in users))
        return [d for d in found if d is not None]

    async def _compare(self, user_id: str, cycle: str, holds: Holds) -> AccountDrift | None:
        reserved, pending, settling = holds.reserved[user_id], holds.pending[user_id], holds.settling[user_id]
        raw = await self._r.hgetall(f"{self._prefix}bal:{user_id}:{cycle}")
        cached = {str(k): str(v) for k, v in raw.items()}
        if not cached:
            return None  # gone since the scan (expired or forgotten): loaded again on first use
        try:
            snapshot = await self._service.ledger.snapshot(user_id, cycle, self._service.clock.now())
        except NotFound:
            return AccountDrift(user_id, (FieldDrift("account", "cached", "no such account"),))
        found: list[FieldDrift] = []
        if "status" in cached:  # else only holds were written so far (by the outbox); the figures load later
            pairs = snapshot_fields(snapshot)
            for name, value in zip(pairs[::2], pairs[1::2], strict=True):
                if not _same(cached.get(str(name)), value):
                    found.append(
                        FieldDrift(_FIELD_NAMES.get(str(name), str(name)), str(cached.get(str(name))), str(value))
                    )
        for name, value in (("reserved", reserved + pending), ("pending", pending), ("settling", settling)):
            if int(cached.get(name) or 0) != value:
                found.append(FieldDrift(name, str(cached.get(name) or 0), str(value)))
        return AccountDrift(user_id, tuple(found)) if found else None

    async def _repair_one(self, user_id: str, cycle: str) -> None:
        key = f"{self._prefix}bal:{user_id}:{cycle}"
        for attempt in range(REPAIR_ATTEMPTS):
            try:
                snapshot = await self._service.ledger.snapshot(user_id, cycle, self._service.clock.now())
            except NotFound:
                await self._r.delete(key)  # nothing in the ledger backs this balance
                return
            # Redis ahead of the ledger on every try (a ledger restored from a backup, say): the ledger wins.
            force = attempt == REPAIR_ATTEMPTS - 1
            if await self._write(key, snapshot, force) == "ok":
                return

    async def _write(self, key: str, snapshot: LedgerSnapshot, force: bool) -> str:
        out = await self._repair(
            keys=[key, f"{self._prefix}res:due", self._outbox.items_key],
            args=[
                f"{self._prefix}res:",
                snapshot.user_id,
                snapshot.cycle,
                snapshot.version,
                BALANCE_TTL_MS,
                1 if force else 0,
                *snapshot_fields(snapshot),
            ],
        )
        return str(out[0])


_FIELD_NAMES = {"used": "allowance_used", "warn": "warn_threshold", "critical": "critical_threshold"}


def _same(cached: str | None, expected: str | int | float) -> bool:
    if cached is None:
        return False
    if isinstance(expected, str):
        try:
            return float(cached) == float(expected)  # thresholds and expiry are written with repr()
        except ValueError:
            return cached == expected
    return int(cached) == expected


async def reconcile(service: QuotaService, repair: bool) -> ReconcileReport:
    """Runs one reconciliation over the service's stores (a RedisHotState with its outbox)."""
    hot, outbox = service.hot, service.outbox
    if not isinstance(hot, RedisHotState) or outbox is None:
        raise StoreUnavailable("reconcile needs the Redis hot state")
    return await Reconciler(service, hot, outbox, service.settings.redis_prefix).run(repair)


async def run_reconcile(settings: Settings, as_json: bool, repair: bool) -> int:
    """The command: prints the report; 0 when Redis agrees with the ledger (or was repaired), 1 on drift,
    6 when a store cannot be reached."""
    ledger: PostgresLedger | None = None
    hot = RedisHotState.from_url(settings.redis_url, settings.redis_prefix)
    try:
        service_box: list[QuotaService] = []
        ledger = await PostgresLedger.connect(settings.database_url, lambda a: service_box[0].limits_of(a), max_size=4)
        service = QuotaService(
            settings, ledger, hot, SystemClock(), Metrics(), UsageOutbox(hot.client, settings.redis_prefix)
        )
        service_box.append(service)
        report = await reconcile(service, repair)
    except (StoreUnavailable, OSError, RedisError) as exc:
        print(f"quotagate reconcile: store unavailable: {exc}", file=sys.stderr)
        return 6
    finally:
        await hot.close()
        if ledger is not None:
            await ledger.close()
    print(json.dumps(report.as_json(), indent=2) if as_json else report.table())
    return 1 if report.drift and not repair else 0
