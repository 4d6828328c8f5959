"""Background loops outlive store errors, yet stop when their task is cancelled, even when the client library
turns the cancellation of its call in flight into an error of its own (redis-py raises ConnectionError)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from quotagate import server
from quotagate.service import QuotaService


class _Service:
    """Just what the sweeper calls. The first drain_outbox fails outright, like a store hiccup; the next hangs
    like a Redis call until cancelled, then does what redis-py may do with the cancellation: raise a
    ConnectionError, or retry on a new connection and return normally."""

    def __init__(self, swallow: str) -> None:
        self.swallow = swallow
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
            if self.swallow == "error":
                raise ConnectionError("Connection closed by server.") from None
        return 0

    async def refresh_stale(self) -> None: ...
    async def expire_due(self) -> None: ...
    async def refresh_client_keys(self) -> None: ...
    async def refresh_plans(self) -> None: ...


@pytest.mark.parametrize("swallow", ["error", "retry"])
async def test_the_sweeper_survives_a_store_error_and_stops_when_cancelled_mid_call(
    monkeypatch: pytest.MonkeyPatch, swallow: str
) -> None:
    monkeypatch.setattr(server, "SWEEP_INTERVAL_SECONDS", 0.01)
    fake = _Service(swallow)
    sweeper = asyncio.create_task(server._sweep(cast(QuotaService, cast(Any, fake))))
    await asyncio.wait_for(fake.hanging.wait(), 5)  # the first error was logged and the loop went on
    assert fake.calls == 2
    sweeper.cancel()
    done, _ = await asyncio.wait({sweeper}, timeout=2)
    assert done == {sweeper} and sweeper.cancelled()
    assert fake.calls == 2  # no round after the stop
