"""Background loops outlive store errors, yet stop when their task is cancelled, even when the client library
turns the cancellation of its call in flight into an error of its own (redis-py raises ConnectionError)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from quotagate import server
from quotagate.service import QuotaService


class _Service:
    """Just what the sweeper calls; drain_outbox hangs like a Redis call until cancelled, then fails as
    redis-py does, and the first call fails outright like a store hiccup."""

    def __init__(self) -> None:
        self.calls = 0
        self.hanging = asyncio.Event()

    async def drain_outbox(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("Redis went away for a moment")
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("Connection closed by server.") from None
        return 0

    async def refresh_stale(self) -> None: ...
    async def expire_due(self) -> None: ...
    async def refresh_client_keys(self) -> None: ...
    async def refresh_plans(self) -> None: ...


async def test_the_sweeper_survives_a_store_error_and_stops_when_cancelled_mid_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "SWEEP_INTERVAL_SECONDS", 0.01)
    fake = _Service()
    sweeper = asyncio.create_task(server._sweep(cast(QuotaService, cast(Any, fake))))
    await asyncio.wait_for(fake.hanging.wait(), 5)  # the first error was logged and the loop went on
    assert fake.calls == 2
    sweeper.cancel()
    done, _ = await asyncio.wait({sweeper}, timeout=2)
    assert done == {sweeper} and sweeper.cancelled()
    assert fake.calls == 2  # no round after the stop
