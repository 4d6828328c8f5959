"""`quotagate serve --workers N`: N serving processes on one gRPC and one HTTP port, kept alive by a parent.

Both listeners set SO_REUSEPORT, so the kernel spreads new connections over the workers; each worker is a
whole quotagate with its own event loop, stores and caches. The parent does no serving and imports neither
grpc nor the stores: it starts the workers, starts a crashed one again (with backoff if it keeps crashing),
and on SIGTERM or SIGINT forwards SIGTERM to each, so each drains as a single `serve` does, then exits.

Work that must happen once per deployment rather than once per process (charging expired reservations,
sending e-mails) runs in worker 0 only: see `WorkerRole`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("quotagate.workers")

# A worker that lived at least this long before it died is treated as a fresh failure (backoff resets).
STABLE_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 30.0
# A worker drains in server.stop's grace (5 s) plus store shutdown; past this it is killed.
STOP_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerRole:
    """Which of the serving processes this one is."""

    index: int = 0
    count: int = 1

    @property
    def runs_singletons(self) -> bool:
        # The expiry sweeper and the e-mail sender are safe to run twice (ledger settles are idempotent by
        # request id, e-mails are claimed with a lease), but once is enough and halves the store traffic.
        return self.index == 0


def restart_delay(quick_failures: int) -> float:
    """0.5 s after the first quick crash, doubling up to 30 s while the worker keeps dying young."""
    return float(min(MAX_RESTART_DELAY_SECONDS, 0.5 * 2 ** max(0, min(quick_failures - 1, 10))))


class Supervisor:
    """Runs `command + ["--worker-index", i]` for i in 0..count-1 until asked to stop."""

    def __init__(self, command: Sequence[str], count: int) -> None:
        if count < 1:
            raise ValueError("workers must be at least 1")
        self._command = list(command)
        self._count = count
        self._stopping = asyncio.Event()
        self.restarts = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        """Returns 0 when every worker exited cleanly after the stop, else the first non-zero exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            codes = await asyncio.gather(*(self._keep(i) for i in range(self._count)))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return next((code for code in codes if code != 0), 0)

    async def _keep(self, index: int) -> int:
        loop = asyncio.get_running_loop()
        quick_failures = 0
        while True:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*self._command, "--worker-index", str(index))
            log.info("worker %d started (pid %d)", index, proc.pid)
            exited = asyncio.ensure_future(proc.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set():
                stopping.cancel()
                return await self._stop_worker(index, proc, exited)
            stopping.cancel()
            code = exited.result()
            quick_failures = quick_failures + 1 if loop.time() - started < STABLE_SECONDS else 1
            delay = restart_delay(quick_failures)
            log.error("worker %d (pid %d) exited with %s; starting it again in %.1f s", index, proc.pid, code, delay)
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return 0

    @staticmethod
    async def _stop_worker(index: int, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> int:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            log.error("worker %d (pid %d) did not drain in %.0f s; killing it", index, proc.pid, STOP_TIMEOUT_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await exited
        log.info("worker %d (pid %d) exited with %s", index, proc.pid, code)
        return code
