"""The usage outbox: settled usage that PostgreSQL could not take yet, kept in Redis until the ledger has it.

A settlement writes the ledger first. When PostgreSQL cannot be reached, the usage goes here instead, in the
same Lua step that releases the request's reservation and holds its cost in the balance, so decisions go on
from Redis with the usage counted. The drainer writes each record to the ledger (usage_events is unique per
request id, so writing one again changes nothing) and only then removes it, again in one step with releasing
the hold and applying the ledger's new figures: every record is charged exactly once, whichever process,
and however many times, drains it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quotagate.core.errors import StoreUnavailable
from quotagate.core.model import LedgerSnapshot
from quotagate.store.ports import UsageRecord
from quotagate.store.redis import BALANCE_TTL_MS, _script, snapshot_fields


@dataclass(frozen=True)
class OutboxItem:
    usage: UsageRecord
    cycle: str  # the cycle the usage is charged to, fixed when it was settled

    @property
    def held(self) -> int:
        """The tokens held in the balance for this record until the ledger has it."""
        return self.usage.cost if self.usage.succeeded else 0

    def encode(self) -> str:
        u = self.usage
        return json.dumps(
            {
                "request_id": u.request_id,
                "user_id": u.user_id,
                "model": u.model,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "cost": u.cost,
                "occurred_at": u.occurred_at.isoformat(),
                "estimated": u.estimated,
                "source": u.source,
                "succeeded": u.succeeded,
                "cycle": self.cycle,
                "held": self.held,
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> OutboxItem:
        data: dict[str, Any] = json.loads(text)
        usage = UsageRecord(
            request_id=data["request_id"],
            user_id=data["user_id"],
            model=data["model"],
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            cost=int(data["cost"]),
            occurred_at=datetime.fromisoformat(data["occurred_at"]),
            estimated=bool(data["estimated"]),
            source=data["source"],
            succeeded=bool(data["succeeded"]),
        )
        return cls(usage, data["cycle"])


class UsageOutbox:
    """The outbox in the same Redis (and under the same key prefix) as the hot state."""

    def __init__(self, client: aioredis.Redis, prefix: str = "qg:") -> None:
        self._r = client
        self._prefix = prefix
        self.items_key = f"{prefix}outbox"
        self.order_key = f"{prefix}outbox:order"
        self._queue = client.register_script(_script("outbox_queue.lua"))
        self._done = client.register_script(_script("outbox_done.lua"))

    def _balance_key(self, user_id: str, cycle: str) -> str:
        return f"{self._prefix}bal:{user_id}:{cycle}"

    async def queue(self, item: OutboxItem) -> bool:
        """Keeps the usage and releases its reservation; False when the request id is queued already."""
        usage = item.usage
        keys = [
            f"{self._prefix}res:{usage.request_id}",
            f"{self._prefix}res:due",
            self.items_key,
            self.order_key,
            self._balance_key(usage.user_id, item.cycle),
        ]
        args: list[str | int | float] = [
            usage.request_id, f"{self._prefix}bal:", item.encode(), item.held, repr(time.time()), BALANCE_TTL_MS,
        ]  # fmt: skip
        try:
            return bool(await self._queue(keys=keys, args=args))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def oldest(self, limit: int) -> list[OutboxItem]:
        try:
            ids = [str(i) for i in await self._r.zrange(self.order_key, 0, limit - 1)]
            if not ids:
                return []
            values = await self._r.hmget(self.items_key, ids)
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [OutboxItem.decode(str(v)) for v in values if v is not None]

    async def all(self) -> list[OutboxItem]:
        try:
            values = await self._r.hvals(self.items_key)
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [OutboxItem.decode(str(v)) for v in values]

    async def size(self) -> int:
        try:
            return int(await self._r.hlen(self.items_key))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def done(self, item: OutboxItem, snapshot: LedgerSnapshot) -> bool:
        """Removes a record the ledger committed, releases its hold and applies `snapshot`; False when another
        drainer did it first."""
        keys = [self.items_key, self.order_key, self._balance_key(item.usage.user_id, item.cycle)]
        args = [item.usage.request_id, item.held, snapshot.version, BALANCE_TTL_MS, *snapshot_fields(snapshot)]
        try:
            return bool(await self._done(keys=keys, args=args))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
