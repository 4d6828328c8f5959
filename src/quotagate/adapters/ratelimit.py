"""envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit: translates descriptors to the limiter and its
decision back, with an OpenAI-style body for the client when a limit is hit."""

from __future__ import annotations

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from quotagate.adapters.credentials import CallerToken
from quotagate.adapters.errors import grpc_errors
from quotagate.adapters.openai_errors import error_body
from quotagate.config import Settings
from quotagate.core.messages import MessageKey, message
from quotagate.metrics import Metrics
from quotagate.ratelimit.limiter import Code, Decision, DescriptorStatus, Entry, RateLimiter, RequestDescriptor
from quotagate.ratelimit.model import Counts, Unit

_Response = rls_pb2.RateLimitResponse
_UINT32_MAX = 2**32 - 1
_UNITS = {
    Unit.SECOND: _Response.RateLimit.SECOND,
    Unit.MINUTE: _Response.RateLimit.MINUTE,
    Unit.HOUR: _Response.RateLimit.HOUR,
    Unit.DAY: _Response.RateLimit.DAY,
    Unit.MONTH: _Response.RateLimit.MONTH,
}


def _status(status: DescriptorStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    out = _Response.DescriptorStatus(
        code=_Response.OVER_LIMIT if status.code is Code.OVER_LIMIT else _Response.OK,
        limit_remaining=max(0, min(status.remaining, _UINT32_MAX)),
    )
    out.duration_until_reset.seconds = status.reset_seconds
    limit = status.limit
    if limit is not None and not limit.unlimited:
        out.current_limit.CopyFrom(
            _Response.RateLimit(
                name=limit.name,
                # The wire field is 32 bits; a monthly token limit can be larger.
                requests_per_unit=min(limit.requests_per_unit, _UINT32_MAX),
                unit=_UNITS[limit.unit],
            )
        )
    return out


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, limiter: RateLimiter, settings: Settings, metrics: Metrics) -> None:
        self._limiter = limiter
        self._settings = settings
        self._metrics = metrics
        self._callers = CallerToken(settings.envoy_token, "ratelimit", "QUOTAGATE_ENVOY_TOKEN", metrics)

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        # Outside grpc_errors, which would take the abort for an unexpected error.
        await self._callers.require(context)
        return await self._should_rate_limit(request, context)

    @grpc_errors
    async def _should_rate_limit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        descriptors = [
            RequestDescriptor(
                tuple(Entry(e.key, e.value) for e in d.entries),
                d.hits_addend.value if d.HasField("hits_addend") else None,
            )
            for d in request.descriptors
        ]
        decision = await self._limiter.should_rate_limit(request.domain, descriptors, request.hits_addend)
        self._count(decision)
        response = _Response(
            overall_code=_Response.OVER_LIMIT if decision.overall_code is Code.OVER_LIMIT else _Response.OK,
            statuses=[_status(s) for s in decision.statuses],
        )
        if decision.overall_code is Code.OVER_LIMIT:
            self._explain(response, decision)
        return response

    def _explain(self, response: rls_pb2.RateLimitResponse, decision: Decision) -> None:
        """The body and headers a client gets with Envoy's 429 (Envoy adds the x-ratelimit-* headers)."""
        over = [s for s in decision.statuses if s.code is Code.OVER_LIMIT]
        seconds = max(1, max(s.reset_seconds for s in over))
        tokens = any(s.limit is not None and s.limit.counts is Counts.TOKENS for s in over)
        key = MessageKey.TOKENS_RATE_LIMITED if tokens else MessageKey.RATE_LIMITED
        text = message(self._settings.language, key, seconds=seconds)
        response.raw_body = error_body(text, "rate_limit_exceeded", "rate_limit_exceeded")
        response.response_headers_to_add.extend(
            [
                base_pb2.HeaderValue(key="content-type", value="application/json"),
                base_pb2.HeaderValue(key="retry-after", value=str(seconds)),
            ]
        )

    def _count(self, decision: Decision) -> None:
        m = self._metrics
        for status in decision.statuses:
            if status.limit is None or status.metric_key is None:
                continue
            key = status.metric_key
            m.ratelimit_hits.labels(key).inc()
            if status.shadow:
                m.ratelimit_shadow.labels(key).inc()
            if status.code is Code.OVER_LIMIT:
                m.ratelimit_over.labels(key).inc()
            else:
                m.ratelimit_within.labels(key).inc()
            if status.near_limit:
                m.ratelimit_near.labels(key).inc()
