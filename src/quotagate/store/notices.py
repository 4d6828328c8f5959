"""Which in-conversation notices were already shown: one claim per account, cycle and threshold.

The claim is a row in PostgreSQL (migration 0008), not a Redis key: Redis is the hot cache that is rebuilt
from the ledger, and a notice repeated after such a rebuild would be noise the user was promised not to get.
`INSERT ... ON CONFLICT DO NOTHING` is atomic, so of two completions finishing at once only one shows it.
Claims are asked for only by warned users' successful completions, and remembered in process once known.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Protocol

import asyncpg

from quotagate.core.errors import StoreUnavailable

__all__ = ["MemoryNoticeBook", "NoticeBook", "PostgresNoticeBook"]

_REMEMBERED = 100_000  # claims known in this process (won or lost): a repeat costs no round trip


class NoticeBook(Protocol):
    async def claim(self, user_id: str, cycle: str, threshold: str, request_id: str, now: datetime) -> bool:
        """True for the one caller that gets to show this notice; False once it was shown."""
        ...


class _Remembered:
    def __init__(self) -> None:
        self._known: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    def known(self, key: tuple[str, str, str]) -> bool:
        return key in self._known

    def remember(self, key: tuple[str, str, str]) -> None:
        self._known[key] = None
        if len(self._known) > _REMEMBERED:
            self._known.popitem(last=False)


class MemoryNoticeBook:
    """The reference implementation, for tests of the parts above the store."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, str, str], str] = {}

    async def claim(self, user_id: str, cycle: str, threshold: str, request_id: str, now: datetime) -> bool:
        key = (user_id, cycle, threshold)
        if key in self._claims:
            return False
        self._claims[key] = request_id
        return True


class PostgresNoticeBook:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._remembered = _Remembered()

    async def claim(self, user_id: str, cycle: str, threshold: str, request_id: str, now: datetime) -> bool:
        key = (user_id, cycle, threshold)
        if self._remembered.known(key):
            return False
        try:
            async with self._pool.acquire() as conn:
                won = await conn.fetchval(
                    """INSERT INTO conversation_notices (user_id, cycle, threshold, request_id, shown_at)
                       VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true""",
                    user_id,
                    cycle,
                    threshold,
                    request_id,
                    now,
                )
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
        self._remembered.remember(key)
        return bool(won)

    async def shown(self, user_id: str) -> list[dict[str, object]]:
        """The notices shown to a user (tests and support)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM conversation_notices WHERE user_id = $1 ORDER BY shown_at, threshold", user_id
            )
        return [dict(r) for r in rows]
