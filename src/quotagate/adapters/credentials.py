"""Who may call quotagate's gRPC services: a bearer token per kind of caller.

Envoy sends `authorization: Bearer <envoy_token>` on Check, ShouldRateLimit and ext_proc's Process (the
gRPC service's initial_metadata, envoyconf); a usage reporter (the LiteLLM callback) sends
`authorization: Bearer <usage_token>` on ReportUsage. A call without its token ends UNAUTHENTICATED before the
handler reads the request, so it changes nothing. Health and reflection stay open; Admin checks its own tokens
(adapters/admin.py).

Check runs thousands of times a second, so the check is one scan of the call's metadata and one constant-time
compare against bytes prepared once.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import grpc

from quotagate.metrics import Metrics

__all__ = ["CallerToken", "bearer_metadata"]

log = logging.getLogger("quotagate.credentials")

# At most one log line per service in this many seconds, however many calls are refused (a scan would
# otherwise fill the log); the metric counts every one.
LOG_INTERVAL_SECONDS = 60.0


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The metadata a caller sends with each call."""
    return (("authorization", f"Bearer {token}"),)


class CallerToken:
    """The token one service's callers must present; `require` at the top of each of its methods."""

    __slots__ = ("_expected", "_last_log", "_refused", "_service", "_setting", "_unlogged")

    def __init__(self, token: str, service: str, setting: str, metrics: Metrics) -> None:
        """`service` labels the metric and the log line; `setting` names the token's setting in the message a
        refused caller gets (never the token itself)."""
        self._expected = f"Bearer {token}".encode()
        self._service, self._setting = service, setting
        self._refused = metrics.unauthenticated_calls.labels(service)
        self._last_log = -LOG_INTERVAL_SECONDS
        self._unlogged = 0

    async def require(self, context: Any) -> None:
        """Returns when the call carries the token; otherwise ends it UNAUTHENTICATED (context.abort raises).

        `context` is a grpc.aio.ServicerContext or the unary server's, which offers the same two methods."""
        presented: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value
                break
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return
        self._refused.inc()
        self._log(presented is None)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{'missing' if presented is None else 'wrong'} caller token: this service takes "
            f"'authorization: Bearer <{self._setting}>'",
        )

    def _log(self, missing: bool) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_SECONDS:
            return
        log.warning(
            "refused %d %s call(s) without the right caller token since the last such line (this one: %s)",
            self._unlogged,
            self._service,
            "no token" if missing else "a wrong token",
            extra={"service": self._service},
        )
        self._last_log, self._unlogged = now, 0
