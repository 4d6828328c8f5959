"""Background loops catch errors so that they outlive a store hiccup; they must still stop when asked."""

from __future__ import annotations

import asyncio


def stop_if_cancelled(exc: BaseException) -> None:
    """Re-raises a cancellation that a client library turned into an error of its own.

    redis-py raises a ConnectionError when the call in flight is cancelled. A loop that swallowed it went on
    running after its server had stopped, kept a reconnected Redis client alive, and held up the shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
