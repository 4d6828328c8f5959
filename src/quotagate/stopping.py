"""Background loops catch errors so that they outlive a store hiccup; they must still stop when asked.

redis-py can swallow the cancellation of the call in flight: it raises a ConnectionError instead, or its
retry runs the command again on a new connection and returns normally. A loop that went on after that ran
past its server's stop, reconnected to Redis, and left the connection open.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled(exc: BaseException | None = None) -> None:
    """Raises CancelledError when the current task was asked to stop, whatever the last call made of it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
