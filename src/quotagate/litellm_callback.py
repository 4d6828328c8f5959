"""A LiteLLM proxy callback that settles quotagate reservations with LiteLLM's own usage figures.

LiteLLM loads it from its config (quotagate must be importable in the proxy's Python, e.g. installed with
``pip install 'quotagate[litellm]'``)::

    litellm_settings:
      callbacks: ["quotagate.litellm_callback.handler"]

Behind Envoy every request reaches LiteLLM with ``x-request-id`` (the key of the reservation that quotagate's
Check placed) and ``x-quota-user`` (the account). LiteLLM keeps the incoming headers in
``litellm_params.proxy_server_request.headers`` (and ``metadata.headers``), without the ``authorization``
header. After each successful completion, streamed or not, the callback calls ``quotagate.v1.Usage/ReportUsage``
with that request id and user, the model group the client asked for and LiteLLM's prompt/completion tokens
(``source="litellm"``). When the proxy answers the client with an error it reports ``FAILED``, which releases
the reservation and charges nothing. ReportUsage is idempotent per request id, so this path and Envoy's ext_proc
may both report the same request: it is charged once.

FAILED is sent from ``async_post_call_failure_hook`` (called once, when the proxy gives up on the request)
and not from ``async_log_failure_event``: LiteLLM calls the latter for every failed attempt, also for one that a
fallback model then answers, and a FAILED report there would settle the request at zero before the successful
attempt is reported.

``QUOTAGATE_USAGE_TARGET`` is quotagate's gRPC address (default ``127.0.0.1:50051``) and
``QUOTAGATE_USAGE_TOKEN`` quotagate's ``usage_token``, sent as ``authorization: Bearer <token>`` (quotagate
refuses a report without it, UNAUTHENTICATED; without the variable the callback sends the development default,
which only a quotagate outside production accepts). Each report waits at most
two seconds; errors are logged and never raised into LiteLLM (an unsettled reservation expires and is charged
its estimate, so a lost report is never a free request).

Nothing else in quotagate imports this module: quotagate itself does not need LiteLLM installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from litellm.integrations.custom_logger import CustomLogger

from quotagate.config import DEFAULT_USAGE_TOKEN
from quotagate.v1 import usage_pb2, usage_pb2_grpc

__all__ = [
    "DEFAULT_TARGET",
    "REPORT_TIMEOUT_SECONDS",
    "TARGET_ENV",
    "TOKEN_ENV",
    "QuotagateUsageReporter",
    "handler",
]

TARGET_ENV = "QUOTAGATE_USAGE_TARGET"
TOKEN_ENV = "QUOTAGATE_USAGE_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"
REPORT_TIMEOUT_SECONDS = 2.0
SOURCE = "litellm"
REQUEST_ID_HEADER = "x-request-id"
USER_HEADER = "x-quota-user"

log = logging.getLogger("quotagate.litellm_callback")


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _header(headers: Mapping[str, Any], name: str) -> str:
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value.strip()
    return ""


def _request_headers(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The client's request headers as LiteLLM's proxy recorded them, from call kwargs or proxy request data."""
    params = _mapping(data.get("litellm_params"))
    for holder in (params, data):
        headers = _mapping(_mapping(holder.get("proxy_server_request")).get("headers"))
        if headers:
            return headers
        headers = _mapping(_mapping(holder.get("metadata")).get("headers"))
        if headers:
            return headers
    return {}


def _metadata(data: Mapping[str, Any]) -> Mapping[str, Any]:
    params = _mapping(data.get("litellm_params"))
    return _mapping(params.get("metadata")) or _mapping(data.get("metadata"))


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _identity(data: Mapping[str, Any]) -> tuple[str, str, str]:
    """(request id, user id, model) for a call: Envoy's headers first, LiteLLM's own values as fallbacks."""
    headers = _request_headers(data)
    metadata = _metadata(data)
    request_id = _header(headers, REQUEST_ID_HEADER) or _text(data.get("litellm_call_id"))
    user_id = (
        _header(headers, USER_HEADER) or _text(data.get("user")) or _text(metadata.get("user_api_key_end_user_id"))
    )
    # The model group is the name the client asked for (what Check saw); "model" is the provider's name.
    model = _text(metadata.get("model_group")) or _text(data.get("model"))
    return request_id, user_id, model


def _tokens(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(0, int(value))


def _usage(kwargs: Mapping[str, Any], response: object) -> tuple[int, int] | None:
    """LiteLLM's (prompt_tokens, completion_tokens) for a finished call, or None when it has none."""
    usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, Mapping):
        usage = response.get("usage")
    candidates: list[Mapping[str, Any]] = []
    if isinstance(usage, Mapping):
        candidates.append(usage)
    elif usage is not None:
        candidates.append({name: getattr(usage, name, None) for name in ("prompt_tokens", "completion_tokens")})
    candidates.append(_mapping(kwargs.get("standard_logging_object")))
    for candidate in candidates:
        prompt = _tokens(candidate.get("prompt_tokens"))
        completion = _tokens(candidate.get("completion_tokens"))
        if prompt is not None or completion is not None:
            return prompt or 0, completion or 0
    return None


def _timestamp(value: object) -> Timestamp | None:
    if isinstance(value, datetime):
        # LiteLLM passes naive local times; astimezone() reads a naive datetime as local time.
        moment = value.astimezone(UTC)
    elif isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        moment = datetime.fromtimestamp(value, UTC)
    else:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class QuotagateUsageReporter(CustomLogger):
    """Reports each LiteLLM proxy call to quotagate's Usage service (see the module docstring)."""

    def __init__(
        self, target: str | None = None, timeout: float = REPORT_TIMEOUT_SECONDS, token: str | None = None
    ) -> None:
        super().__init__()
        self._target = target
        self._token = token
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: usage_pb2_grpc.UsageStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def target(self) -> str:
        return self._target or os.environ.get(TARGET_ENV, "").strip() or DEFAULT_TARGET

    @property
    def token(self) -> str:
        return self._token or os.environ.get(TOKEN_ENV, "").strip() or DEFAULT_USAGE_TOKEN

    def _usage_stub(self) -> usage_pb2_grpc.UsageStub:
        # A grpc.aio channel belongs to the event loop that created it; LiteLLM runs its hooks on the proxy's loop.
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = usage_pb2_grpc.UsageStub(self._channel)
            self._loop = loop
        return self._stub

    async def report(self, request: usage_pb2.ReportUsageRequest) -> usage_pb2.ReportUsageResponse | None:
        """Send one report; None (and a log line) when it could not be delivered. Never raises."""
        try:
            response: usage_pb2.ReportUsageResponse = await self._usage_stub().ReportUsage(
                request, timeout=self._timeout, metadata=(("authorization", f"Bearer {self.token}"),)
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "quotagate ReportUsage for request %s failed: %s %s",
                request.request_id,
                exc.code().name,
                exc.details(),
            )
            return None
        except Exception:
            log.exception("quotagate ReportUsage for request %s failed", request.request_id)
            return None
        log.debug(
            "quotagate ReportUsage for request %s: charged=%s cost=%s",
            request.request_id,
            response.charged,
            response.cost,
        )
        return response

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        try:
            request_id, user_id, model = _identity(kwargs)
            if not request_id or (not user_id and not _header(_request_headers(kwargs), REQUEST_ID_HEADER)):
                log.warning("LiteLLM call %s has no x-request-id and no user; not reported", request_id or "?")
                return
            usage = _usage(kwargs, response_obj)
            if usage is None:
                log.warning("LiteLLM call %s returned no usage; its reservation will expire", request_id)
                return
            prompt_tokens, completion_tokens = usage
            request = usage_pb2.ReportUsageRequest(
                request_id=request_id,
                user_id=user_id,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                status=usage_pb2.ReportUsageRequest.SUCCEEDED,
                source=SOURCE,
            )
            stamp = _timestamp(end_time)
            if stamp is not None:
                request.occurred_at.CopyFrom(stamp)
        except Exception:
            log.exception("could not build a quotagate usage report from a LiteLLM success event")
            return
        await self.report(request)

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        try:
            request_id = _header(_request_headers(request_data), REQUEST_ID_HEADER)
            if not request_id:
                # Without Envoy's id there is no reservation to release.
                return
            _, user_id, model = _identity(request_data)
            request = usage_pb2.ReportUsageRequest(
                request_id=request_id,
                user_id=user_id,
                model=model,
                status=usage_pb2.ReportUsageRequest.FAILED,
                source=SOURCE,
            )
        except Exception:
            log.exception("could not build a quotagate failure report from a LiteLLM error")
            return
        await self.report(request)
        # None: the client gets LiteLLM's own error unchanged.
        return None


handler = QuotagateUsageReporter()
