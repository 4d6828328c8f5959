"""envoy.service.auth.v3.Authorization/Check: who is asking, what it may cost, allow or deny."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from quotagate.adapters.openai_errors import (
    HttpDenial,
    auth_denial,
    invalid_request,
    quota_denial,
    quota_headers,
)
from quotagate.config import Client, Settings
from quotagate.core.decide import Decision
from quotagate.core.errors import InvalidRequest, StoreUnavailable
from quotagate.core.estimate import CompletionRequest, parse_body
from quotagate.core.messages import MessageKey
from quotagate.envoyconf import ASK_USAGE_HEADER, SETTLE_FIRST_HEADER
from quotagate.service import QuotaService, validate_id
from quotagate.store.ports import NewAccount

log = logging.getLogger("quotagate.ext_authz")

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class Rejected(Exception):
    """A request answered by quotagate itself (401/400), before any quota is looked at."""

    def __init__(self, denial: HttpDenial, state: str) -> None:
        super().__init__(state)
        self.denial, self.state = denial, state


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify(
    settings: Settings, headers: Mapping[str, str], lookup: Callable[[str], Client | None] | None = None
) -> tuple[Client, NewAccount]:
    """The client from its key and the user it speaks for; Rejected with a 401 otherwise.

    `lookup` finds a key among the configured clients and any others (the database keys, cached in
    memory); without it only the configured clients are known."""
    key = bearer(headers)
    client = (lookup or settings.client_by_key)(key) if key else None
    if client is None:
        raise Rejected(auth_denial(settings, MessageKey.INVALID_KEY), "unauthenticated")
    asserted = headers.get("x-user-id", "").strip()
    if client.trusted:
        if not asserted:
            raise Rejected(auth_denial(settings, MessageKey.MISSING_USER), "unauthenticated")
        user_id = asserted
    else:
        if asserted and asserted != client.user_id:
            raise Rejected(auth_denial(settings, MessageKey.USER_NOT_ALLOWED), "unauthenticated")
        user_id = client.user_id or ""
    try:
        user_id = validate_id("x-user-id", user_id)
    except InvalidRequest as exc:
        raise Rejected(invalid_request(settings, str(exc)), "invalid") from None
    email = headers.get("x-user-email", "")[:320] if client.trusted else ""
    name = headers.get("x-user-name", "")[:200] if client.trusted else ""
    return client, NewAccount(user_id=user_id, email=email, name=name)


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # Built afresh for each response. A cache of these messages (values repeat across Checks) saved no
    # measurable time and made quotagate's memory grow by ~12 bytes per Check (bench/README.md, "Memory").
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def denied(denial: HttpDenial, code: int) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=denial.status),
            headers=[_header(k, v) for k, v in denial.headers.items()],
            body=denial.body.decode(),
        ),
    )


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, service: QuotaService) -> None:
        self._service = service
        self._settings = service.settings

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        metrics = self._service.metrics
        try:
            response, state = await self._check(request)
        except StoreUnavailable as exc:
            policy = self._settings.on_store_error
            metrics.store_errors.labels(policy).inc()
            metrics.decisions.labels("error").inc()
            # One line per decision taken without the store, naming the request (a fail-open one goes unmetered).
            log.error(
                "store unavailable; on_store_error=%s: %s",
                policy,
                exc,
                extra={"request_id": request.attributes.request.http.headers.get("x-request-id", "")},
            )
            if policy == "allow":
                return external_auth_pb2.CheckResponse(
                    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
                )
            # UNAVAILABLE lets Envoy's own failure mode decide (status_on_error, fail-open or closed).
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
            raise
        metrics.decisions.labels(state).inc()
        metrics.check_seconds.observe(time.perf_counter() - started)
        return response

    async def _check(self, request: external_auth_pb2.CheckRequest) -> tuple[external_auth_pb2.CheckResponse, str]:
        http = request.attributes.request.http
        headers = http.headers  # Envoy sends header names in lower case
        try:
            client, user = identify(self._settings, headers, self._service.client_by_key)
            try:
                completion = parse_body(http.raw_body or http.body.encode())
            except InvalidRequest as exc:
                raise Rejected(invalid_request(self._settings, str(exc)), "invalid") from None
        except Rejected as rejected:
            code = code_pb2.UNAUTHENTICATED if rejected.denial.status == 401 else code_pb2.INVALID_ARGUMENT
            return denied(rejected.denial, code), rejected.state
        request_id = (headers.get("x-request-id") or http.id or str(uuid.uuid4()))[:256]
        decision = await self._service.check(user, request_id, completion)
        if not decision.allowed:
            now = self._service.clock.now()
            purchase_url = self._service.links.purchase_url(user.user_id, now)
            balance_url = self._service.links.balance_url(user.user_id, now)
            denial = quota_denial(decision, self._settings, now, purchase_url, balance_url)
            code = code_pb2.PERMISSION_DENIED if denial.status == 403 else code_pb2.RESOURCE_EXHAUSTED
            return denied(denial, code), decision.state.value
        return self._allowed(decision, user.user_id, request_id, client, completion), decision.state.value

    def _allowed(
        self, decision: Decision, user_id: str, request_id: str, client: Client, completion: CompletionRequest | None
    ) -> external_auth_pb2.CheckResponse:
        upstream = [_header("x-quota-user", user_id)]
        notice = decision.warn and self._settings.notices.in_conversation
        if completion is not None and completion.needs_usage_asked:
            # Routes the request to where ext_proc also sees the request (envoyconf), to ask for the usage.
            upstream.append(_header(ASK_USAGE_HEADER, "1"))
        elif completion is not None and decision.reserved and (notice or not decision.settles_unseen):
            # Routes the response to the ext_proc that holds it until the charge lands (or the notice is in);
            # any other response is only watched, and its charge lands just after it.
            upstream.append(_header(SETTLE_FIRST_HEADER, "1"))
        remove: list[str] = []
        if self._settings.upstream_api_key:
            # The upstream (LiteLLM) gets its own key, never the client's.
            upstream.append(_header("authorization", f"Bearer {self._settings.upstream_api_key}"))
        else:
            remove.append("authorization")
        metadata = struct_pb2.Struct()
        fields = metadata.fields
        fields["user_id"].string_value = user_id
        fields["request_id"].string_value = request_id  # ext_proc's key when it does not see the request
        fields["client"].string_value = client.name
        fields["state"].string_value = decision.state.value
        fields["estimate"].number_value = decision.estimate
        fields["reserved"].bool_value = decision.reserved
        if completion is not None:
            # Handed to ext_proc (Envoy forwards this namespace), so it reads the request body only when it
            # must ask a stream for its usage.
            fields["model"].string_value = completion.model
            fields["prompt_chars"].number_value = completion.prompt_chars
            fields["ask_usage"].bool_value = completion.needs_usage_asked
            # Far from every threshold ext_proc may answer before the charge lands (Decision.settles_unseen).
            fields["settle_later"].bool_value = decision.settles_unseen
            fields["plan"].string_value = decision.balance.limits.plan_id
            if notice:
                # ext_proc adds the notice for this threshold to the answer if nobody showed it yet this cycle.
                fields["notice"].string_value = decision.state.value
        to_client = [_header(k, v) for k, v in quota_headers(decision.balance, decision.state).items()]
        if decision.warn:
            purchase_url = self._service.links.purchase_url(user_id, self._service.clock.now())
            if purchase_url:
                to_client.append(_header("x-quota-purchase-url", purchase_url))
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=upstream,
                headers_to_remove=remove,
                response_headers_to_add=to_client,
            ),
            dynamic_metadata=metadata,
        )
