"""quotagate.v1.Admin: the operators' API, behind named bearer tokens with roles."""

from __future__ import annotations

import hmac
from datetime import UTC

import grpc

from quotagate.adapters.convert import balance_message, timestamp
from quotagate.adapters.errors import PermissionDenied, Unauthenticated, grpc_errors
from quotagate.config import AdminToken, Settings, sha256_hex
from quotagate.core.errors import InvalidRequest
from quotagate.core.model import AccountStatus
from quotagate.service import QuotaService
from quotagate.v1 import admin_pb2, admin_pb2_grpc

_ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


def authorize(settings: Settings, context: grpc.aio.ServicerContext, needed: str) -> AdminToken:
    """The admin token presented in the call's metadata, if it is known and has the role needed."""
    presented = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, secret = value.partition(" ")
            if scheme.lower() == "bearer":
                presented = secret.strip()
    if not presented:
        raise Unauthenticated("missing admin token: send 'authorization: Bearer <token>'")
    digest = sha256_hex(presented)
    found = None
    for token in settings.admin_tokens:
        # Compare every token in constant time, so timing tells nothing about which one nearly matched.
        if hmac.compare_digest(token.token_sha256, digest):
            found = token
    if found is None:
        raise Unauthenticated("unknown admin token")
    if _ROLE_RANK[found.role] < _ROLE_RANK[needed]:
        raise PermissionDenied(f"token {found.name!r} has role {found.role}; this call needs {needed}")
    return found


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, service: QuotaService) -> None:
        self._service = service

    @grpc_errors
    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        authorize(self._service.settings, context, "viewer")
        return await self._account(request.user_id)

    async def _account(self, user_id: str) -> admin_pb2.Account:
        account, balance = await self._service.account(user_id)
        return admin_pb2.Account(
            user_id=account.user_id,
            email=account.email,
            name=account.name,
            plan=account.plan_id,
            status=account.status.value,
            allowance_override=account.allowance_override or 0,
            has_allowance_override=account.allowance_override is not None,
            balance=balance_message(balance),
            created_at=timestamp(account.created_at),
        )

    @grpc_errors
    async def GrantCredits(
        self, request: admin_pb2.GrantCreditsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GrantCreditsResponse:
        token = authorize(self._service.settings, context, "operator")
        expires_at = request.expires_at.ToDatetime(UTC) if request.HasField("expires_at") else None
        grant_id, balance = await self._service.grant(
            request.user_id, request.amount, request.reason, expires_at, request.source or "admin", token.name
        )
        return admin_pb2.GrantCreditsResponse(grant_id=grant_id, balance=balance_message(balance))

    @grpc_errors
    async def SuspendAccount(
        self, request: admin_pb2.SetAccountStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        return await self._set_status(request, context, AccountStatus.SUSPENDED)

    @grpc_errors
    async def ActivateAccount(
        self, request: admin_pb2.SetAccountStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        return await self._set_status(request, context, AccountStatus.ACTIVE)

    async def _set_status(
        self,
        request: admin_pb2.SetAccountStatusRequest,
        context: grpc.aio.ServicerContext,
        status: AccountStatus,
    ) -> admin_pb2.Account:
        token = authorize(self._service.settings, context, "operator")
        if len(request.reason.strip()) < 3:
            raise InvalidRequest("reason is required: say why the account's status changes")
        await self._service.set_status(request.user_id, status, request.reason.strip(), token.name)
        return await self._account(request.user_id)
