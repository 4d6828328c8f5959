"""quotagate.v1.Usage/ReportUsage, for callers holding the usage reporter's token (usage_token)."""

from __future__ import annotations

import grpc

from quotagate.adapters.convert import balance_message, datetime_of
from quotagate.adapters.credentials import CallerToken
from quotagate.adapters.errors import grpc_errors
from quotagate.service import QuotaService, UsageReport
from quotagate.v1 import usage_pb2, usage_pb2_grpc


class UsageService(usage_pb2_grpc.UsageServicer):
    def __init__(self, service: QuotaService) -> None:
        self._service = service
        self._callers = CallerToken(service.settings.usage_token, "usage", "QUOTAGATE_USAGE_TOKEN", service.metrics)

    async def ReportUsage(
        self, request: usage_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.ReportUsageResponse:
        # Outside grpc_errors, which would take the abort for an unexpected error.
        await self._callers.require(context)
        return await self._report(request, context)

    @grpc_errors
    async def _report(
        self, request: usage_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.ReportUsageResponse:
        occurred_at = datetime_of(request, "occurred_at")
        outcome, balance = await self._service.report_usage(
            UsageReport(
                request_id=request.request_id,
                user_id=request.user_id,
                model=request.model,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                succeeded=request.status != usage_pb2.ReportUsageRequest.FAILED,
                occurred_at=occurred_at,
                estimated=request.estimated,
                source=request.source or "api",
            )
        )
        return usage_pb2.ReportUsageResponse(
            charged=outcome.charged, cost=outcome.cost, balance=balance_message(balance)
        )
