"""Revoked client keys refused everywhere within a second.

Every process keeps the active database keys in memory (Check never reads PostgreSQL). A create or revoke
bumps a counter in Redis after the change is committed; every process reads that counter a few times a second
(one GET) and reloads its keys from PostgreSQL when it moved. The periodic full reload stays as the fallback
for when Redis cannot be reached."""

from __future__ import annotations

import asyncio
import logging

from quotagate.service import QuotaService
from quotagate.stopping import stop_if_cancelled
from quotagate.store.resp import PipelinedRedis

log = logging.getLogger("quotagate.keywatch")

POLL_SECONDS = 0.2


class ClientKeyVersion:
    # Over the pipelined connection: a GET five times a second costs next to nothing there, and a cancelled
    # call is simply cancelled (redis-py may turn a cancellation into a connection error).
    def __init__(self, redis: PipelinedRedis, prefix: str) -> None:
        self._r = redis
        self._key = f"{prefix}client-keys:version"

    async def bump(self) -> None:
        await self._r.execute("INCR", self._key)

    async def read(self) -> str | None:
        value = await self._r.execute("GET", self._key)
        return None if value is None else str(value)


async def watch_client_keys(service: QuotaService, version: ClientKeyVersion, interval: float | None = None) -> None:
    """Reloads the service's client keys whenever the version moves (and once at the start)."""
    interval = interval or POLL_SECONDS
    seen: str | None = "<unread>"
    failing = False
    while True:
        try:
            current = await version.read()
            if current != seen:
                await service.refresh_client_keys()
                seen = current
            if failing:
                log.info("client key version readable again")
            failing = False
        except Exception as exc:
            stop_if_cancelled(exc)
            if not failing:  # once per outage, not five times a second
                log.warning("cannot reload client keys on their version; they reload every sweep meanwhile: %s", exc)
            failing = True
        stop_if_cancelled()
        await asyncio.sleep(interval * 5 if failing else interval)
