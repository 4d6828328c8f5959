"""quotagate.v1.Admin: the operators' API, behind named bearer tokens with roles."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from quotagate.adapters.convert import balance_message, datetime_of, timestamp
from quotagate.adapters.errors import PermissionDenied, Unauthenticated, grpc_errors, status_code_of
from quotagate.billing.service import Billing
from quotagate.billing.store import PaymentRecord
from quotagate.config import AdminToken, Settings, sha256_hex
from quotagate.core.auth_failures import FailedAuthLimiter, peer_key
from quotagate.core.errors import InvalidRequest
from quotagate.core.model import AccountStatus, Balance, ModelWeight, Plan
from quotagate.core.plans import PlanChanges
from quotagate.metrics import Metrics
from quotagate.service import QuotaService, page_size, validate_id
from quotagate.store.ports import AccountChanges, AccountRecord, ClientKeyRecord, PlanRecord, UsageTotals
from quotagate.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("quotagate.rpc")

_ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


class UnknownAdminToken(Unauthenticated):
    """A token was presented and matched none: a guess, counted against the peer's budget."""


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
        raise UnknownAdminToken("unknown admin token")
    if _ROLE_RANK[found.role] < _ROLE_RANK[needed]:
        raise PermissionDenied(f"token {found.name!r} has role {found.role}; this call needs {needed}")
    return found


class AdminAuth:
    """authorize() with a budget of wrong tokens per peer IP (admin.failed_auth): past it the peer is refused
    without its token being compared until the window passes, so guessing costs a window per few tries."""

    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._metrics = metrics
        limit = settings.admin_failed_auth
        self._failures = FailedAuthLimiter(limit.max_failures, limit.window_seconds, clock)

    def check(self, context: grpc.aio.ServicerContext, needed: str) -> AdminToken:
        peer = peer_key(context.peer() or "")
        wait = self._failures.retry_after(peer)
        if wait > 0:
            self._metrics.admin_auth_failures.labels("blocked").inc()
            seconds = math.ceil(wait)
            context.set_trailing_metadata((("retry-after", str(seconds)),))
            raise Unauthenticated(f"too many failed attempts, retry after {seconds} s")
        try:
            return authorize(self._settings, context, needed)
        except UnknownAdminToken:
            self._metrics.admin_auth_failures.labels("unknown_token").inc()
            if self._failures.failed(peer) > 0:
                log.warning("admin peer %s refused for a while: too many wrong admin tokens", peer)
            raise


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, service: QuotaService, billing: Billing | None = None) -> None:
        self._service = service
        self._billing = billing
        # The service's clock, so a test that pins time also decides when a blocked peer may try again.
        self._auth = AdminAuth(service.settings, service.metrics, lambda: service.clock.now().timestamp())

    @grpc_errors
    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        self._auth.check(context, "viewer")
        return await self._account(request.user_id)

    async def _account(self, user_id: str) -> admin_pb2.Account:
        account, balance = await self._service.account(user_id)
        return _account_message(account, balance)

    @grpc_errors
    async def ListAccounts(
        self, request: admin_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAccountsResponse:
        self._auth.check(context, "viewer")
        items, last = await self._service.list_accounts(
            request.state.strip().lower(),
            request.plan.strip(),
            request.query.strip(),
            request.page_size,
            _decode_token(request.page_token, "a"),
        )
        return admin_pb2.ListAccountsResponse(
            accounts=[_account_message(a, b) for a, b in items],
            next_page_token=_encode_token("a", last) if last else "",
        )

    @grpc_errors
    async def AdjustCredits(
        self, request: admin_pb2.AdjustCreditsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdjustCreditsResponse:
        token = self._auth.check(context, "operator")
        removed, balance = await self._service.adjust(request.user_id, request.amount, request.reason, token.name)
        return admin_pb2.AdjustCreditsResponse(removed=removed, balance=balance_message(balance))

    @grpc_errors
    async def GetUsage(
        self, request: admin_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetUsageResponse:
        self._auth.check(context, "viewer")
        start, end, rows = await self._service.usage(
            request.user_id,
            request.cycle.strip(),
            datetime_of(request, "start"),
            datetime_of(request, "end"),
            request.group_by.strip().lower(),
        )
        total = UsageTotals(
            "",
            "",
            sum(r.requests for r in rows),
            sum(r.prompt_tokens for r in rows),
            sum(r.completion_tokens for r in rows),
            sum(r.cost for r in rows),
        )
        return admin_pb2.GetUsageResponse(
            user_id=request.user_id.strip(),
            start=timestamp(start),
            end=timestamp(end),
            rows=[_usage_row(r) for r in rows],
            total=_usage_row(total),
        )

    async def ExportUsage(
        self, request: admin_pb2.ExportUsageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.ExportChunk]:
        try:
            self._auth.check(context, "viewer")
            chunks = self._service.export_usage(
                request.user_id,
                request.cycle.strip(),
                datetime_of(request, "start"),
                datetime_of(request, "end"),
                request.format,
            )
            async for data in chunks:
                yield admin_pb2.ExportChunk(data=data)
            return
        except Exception as exc:
            code = status_code_of(exc)
            if code is None:
                log.exception("unexpected error in ExportUsage")
            failure = (code or grpc.StatusCode.INTERNAL, str(exc) if code else "internal error; see the quotagate log")
        await context.abort(*failure)

    @grpc_errors
    async def ListAuditLog(
        self, request: admin_pb2.ListAuditLogRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditLogResponse:
        self._auth.check(context, "viewer")
        size = page_size(request.page_size)
        rows = await self._service.queries().audit_log(
            request.target.strip(), request.action.strip(), _id_token(request.page_token, "l"), size + 1
        )
        return admin_pb2.ListAuditLogResponse(
            entries=[
                admin_pb2.AuditEntry(
                    id=r["id"],
                    actor=r["actor"],
                    action=r["action"],
                    target=r["target"],
                    before_json=r["before"] or "",
                    after_json=r["after"] or "",
                    reason=r["reason"],
                    created_at=timestamp(r["created_at"]),
                )
                for r in rows[:size]
            ],
            next_page_token=_next_id_token("l", rows, size),
        )

    @grpc_errors
    async def ListLedger(
        self, request: admin_pb2.ListLedgerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListLedgerResponse:
        self._auth.check(context, "viewer")
        size = page_size(request.page_size)
        user_id = validate_id("user_id", request.user_id)
        rows = await self._service.queries().ledger_entries(user_id, _id_token(request.page_token, "e"), size + 1)
        return admin_pb2.ListLedgerResponse(
            entries=[
                admin_pb2.LedgerEntry(
                    id=r["id"],
                    cycle=r["cycle"],
                    kind=r["kind"],
                    draws_from=r["draws_from"],
                    amount=r["amount"],
                    grant_id=r["grant_id"] or 0,
                    request_id=r["request_id"] or "",
                    reason=r["reason"],
                    actor=r["actor"],
                    created_at=timestamp(r["created_at"]),
                )
                for r in rows[:size]
            ],
            next_page_token=_next_id_token("e", rows, size),
        )

    @grpc_errors
    async def ResetCycle(
        self, request: admin_pb2.ResetCycleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        token = self._auth.check(context, "admin")
        await self._service.reset_cycle(request.user_id, request.reason, token.name)
        return await self._account(request.user_id)

    @grpc_errors
    async def UpsertAccount(
        self, request: admin_pb2.UpsertAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        token = self._auth.check(context, "admin")
        if request.clear_allowance_override and request.HasField("allowance_override"):
            raise InvalidRequest("give allowance_override or clear_allowance_override, not both")
        changes = AccountChanges(
            email=request.email if request.HasField("email") else None,
            name=request.name if request.HasField("name") else None,
            plan_id=request.plan if request.HasField("plan") else None,
            allowance_override=request.allowance_override if request.HasField("allowance_override") else None,
            clear_allowance_override=request.clear_allowance_override,
        )
        await self._service.upsert_account(request.user_id, changes, request.reason, token.name)
        return await self._account(request.user_id)

    @grpc_errors
    async def CreateClientKey(
        self, request: admin_pb2.CreateClientKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateClientKeyResponse:
        token = self._auth.check(context, "admin")
        secret, record = await self._service.create_client_key(
            request.name, request.trusted, request.user_id, request.reason, token.name
        )
        return admin_pb2.CreateClientKeyResponse(secret=secret, key=_client_key_message(record))

    @grpc_errors
    async def ListClientKeys(
        self, request: admin_pb2.ListClientKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListClientKeysResponse:
        self._auth.check(context, "admin")
        keys = await self._service.key_store().client_keys(include_revoked=not request.active_only)
        return admin_pb2.ListClientKeysResponse(keys=[_client_key_message(k) for k in keys])

    @grpc_errors
    async def RevokeClientKey(
        self, request: admin_pb2.RevokeClientKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClientKey:
        token = self._auth.check(context, "admin")
        record = await self._service.revoke_client_key(request.name, request.reason, token.name)
        return _client_key_message(record)

    @grpc_errors
    async def ListPlans(
        self, request: admin_pb2.ListPlansRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPlansResponse:
        self._auth.check(context, "viewer")
        records = await self._service.list_plans(request.active_only)
        return admin_pb2.ListPlansResponse(plans=[_plan_message(r) for r in records])

    @grpc_errors
    async def GetPlan(self, request: admin_pb2.GetPlanRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Plan:
        self._auth.check(context, "viewer")
        return _plan_message(await self._service.get_plan(request.id))

    @grpc_errors
    async def CreatePlan(
        self, request: admin_pb2.CreatePlanRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Plan:
        token = self._auth.check(context, "admin")
        defaults = Plan(id="", monthly_allowance=0)
        plan = Plan(
            id=request.id.strip(),
            name=request.name.strip(),
            monthly_allowance=request.monthly_allowance,
            warn_threshold=request.warn_threshold if request.HasField("warn_threshold") else defaults.warn_threshold,
            critical_threshold=request.critical_threshold
            if request.HasField("critical_threshold")
            else defaults.critical_threshold,
            weights=_weights(request.model_weights),
            active=request.active if request.HasField("active") else True,
        )
        return _plan_message(await self._service.create_plan(plan, request.reason, token.name))

    @grpc_errors
    async def UpdatePlan(
        self, request: admin_pb2.UpdatePlanRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Plan:
        token = self._auth.check(context, "admin")
        if request.model_weights and not request.replace_model_weights:
            raise InvalidRequest("model_weights replace the plan's weights: set replace_model_weights too")
        changes = PlanChanges(
            name=request.name.strip() if request.HasField("name") else None,
            monthly_allowance=request.monthly_allowance if request.HasField("monthly_allowance") else None,
            warn_threshold=request.warn_threshold if request.HasField("warn_threshold") else None,
            critical_threshold=request.critical_threshold if request.HasField("critical_threshold") else None,
            weights=_weights(request.model_weights) if request.replace_model_weights else None,
            active=request.active if request.HasField("active") else None,
        )
        record = await self._service.update_plan(request.id, changes, request.reason, token.name)
        return _plan_message(record)

    @grpc_errors
    async def GrantCredits(
        self, request: admin_pb2.GrantCreditsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GrantCreditsResponse:
        token = self._auth.check(context, "operator")
        expires_at = datetime_of(request, "expires_at")
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
        token = self._auth.check(context, "operator")
        await self._service.set_status(request.user_id, status, request.reason, token.name)
        return await self._account(request.user_id)

    # -- payments (Stripe Checkout) ----------------------------------------------------------------------

    def _payments(self) -> Billing:
        if self._billing is None:
            raise InvalidRequest("payments are not kept by this server")
        return self._billing

    @grpc_errors
    async def ListPayments(
        self, request: admin_pb2.ListPaymentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPaymentsResponse:
        self._auth.check(context, "viewer")
        size = page_size(request.page_size)
        rows = await self._payments().search(
            request.user_id,
            request.status.strip().lower(),
            request.session_id,
            datetime_of(request, "start"),
            datetime_of(request, "end"),
            _id_token(request.page_token, "p"),
            size + 1,
        )
        return admin_pb2.ListPaymentsResponse(
            payments=[_payment_message(p) for p in rows[:size]],
            next_page_token=_encode_token("p", str(rows[size - 1].id)) if len(rows) > size else "",
        )

    @grpc_errors
    async def ReconcilePayment(
        self, request: admin_pb2.ReconcilePaymentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReconcilePaymentResponse:
        token = self._auth.check(context, "operator")
        result = await self._payments().reconcile(request.session_id)
        log.info(
            "payment reconciled",
            extra={"session_id": result.session.id, "granted": result.granted, "actor": token.name},
        )
        return admin_pb2.ReconcilePaymentResponse(
            payment=_payment_message(result.payment) if result.payment else None,
            granted=result.granted,
            payment_status=result.session.payment_status,
            session_status=result.session.status,
        )


def _payment_message(payment: PaymentRecord) -> admin_pb2.Payment:
    return admin_pb2.Payment(
        id=payment.id,
        session_id=payment.session_id,
        payment_intent=payment.payment_intent,
        user_id=payment.user_id,
        package_id=payment.package_id,
        tokens=payment.tokens,
        amount=payment.amount,
        currency=payment.currency,
        status=payment.status,
        grant_id=payment.grant_id or 0,
        refunded_amount=payment.refunded_amount,
        tokens_removed=payment.tokens_removed,
        failure_message=payment.failure_message,
        created_at=timestamp(payment.created_at),
        updated_at=timestamp(payment.updated_at),
    )


def _account_message(account: AccountRecord, balance: Balance) -> admin_pb2.Account:
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


def _weights(messages: Iterable[admin_pb2.ModelWeight]) -> tuple[ModelWeight, ...]:
    return tuple(ModelWeight(m.pattern.strip(), m.input, m.output) for m in messages)


def _plan_message(record: PlanRecord) -> admin_pb2.Plan:
    plan = record.plan
    return admin_pb2.Plan(
        id=plan.id,
        name=plan.name,
        monthly_allowance=plan.monthly_allowance,
        warn_threshold=plan.warn_threshold,
        critical_threshold=plan.critical_threshold,
        model_weights=[admin_pb2.ModelWeight(pattern=w.pattern, input=w.input, output=w.output) for w in plan.weights],
        active=plan.active,
        accounts=record.accounts,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
    )


def _client_key_message(key: ClientKeyRecord) -> admin_pb2.ClientKey:
    message = admin_pb2.ClientKey(
        name=key.name,
        trusted=key.trusted,
        user_id=key.user_id or "",
        created_at=timestamp(key.created_at),
        created_by=key.created_by,
    )
    if key.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(key.revoked_at))
    return message


def _usage_row(row: UsageTotals) -> admin_pb2.UsageRow:
    return admin_pb2.UsageRow(
        period=row.period,
        model=row.model,
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost=row.cost,
    )


# Page tokens are opaque to clients: a kind letter and the keyset position, base64url-encoded.


def _encode_token(kind: str, position: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def _decode_token(token: str, kind: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("page_token is not valid") from None
    found, sep, position = raw.partition(":")
    if found != kind or not sep or not position:
        raise InvalidRequest("page_token is not valid")
    return position


def _id_token(token: str, kind: str) -> int:
    position = _decode_token(token, kind)
    if not position:
        return 0
    if not position.isdigit() or int(position) <= 0:
        raise InvalidRequest("page_token is not valid")
    return int(position)


def _next_id_token(kind: str, rows: list[dict[str, Any]], size: int) -> str:
    return _encode_token(kind, str(rows[size - 1]["id"])) if len(rows) > size else ""
