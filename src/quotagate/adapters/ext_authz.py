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

from quotagate.adapters.credentials import CallerToken
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
from quotagate.core.estimate import ApiKind, CompletionRequest, parse_body
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


# Who the request is from and for: one value each, in UTF-8, or the request is refused (request_headers).
IDENTITY_HEADERS = frozenset({"authorization", "x-user-id", "x-user-email", "x-user-name"})
# The header namespace quotagate speaks in to the upstream (x-quota-user, the routing headers): whatever a client
# sends in it is removed before the upstream, whatever the decision.
QUOTA_HEADER_PREFIX = "x-quota-"


def request_headers(http: external_auth_pb2.AttributeContext.HttpRequest) -> Mapping[str, str]:
    """The request's headers by lower-case name. Envoy sends them as sent (header_map, encode_raw_headers in the
    shipped config) or in its `headers` map, where repeated headers are joined with commas and bytes that are
    not UTF-8 are replaced: there two x-user-id values, or two different non-UTF-8 ones, would read as one
    account. An identity header sent twice or not in UTF-8 is refused (InvalidRequest); other repeated headers
    are joined as Envoy joins them."""
    raw = http.header_map.headers
    if not raw:
        joined: Mapping[str, str] = http.headers
        return joined
    headers: dict[str, str] = {}
    for entry in raw:
        name = entry.key
        if name in IDENTITY_HEADERS:
            if name in headers:
                raise InvalidRequest(f"{name} must be sent once")
            try:
                headers[name] = entry.raw_value.decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"{name} must be UTF-8") from None
            continue
        value = entry.raw_value.decode(errors="replace")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


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
    if "," in asserted:
        # Also how Envoy's headers map shows an x-user-id sent twice: never one account named "a,b".
        raise Rejected(invalid_request(settings, "x-user-id must be one user id, without commas"), "invalid")
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
        self._callers = CallerToken(
            self._settings.envoy_token, "authorization", "QUOTAGATE_ENVOY_TOKEN", service.metrics
        )

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        await self._callers.require(context)  # Envoy's token; anyone else reaching the port is refused
        started = time.perf_counter()
        metrics = self._service.metrics
        try:
            response, state = await self._check(request)
        except StoreUnavailable as exc:
            # on_store_error: deny (allow is answered in _check). UNAVAILABLE lets Envoy's own failure mode
            # decide (status_on_error, fail-open or closed).
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
            raise
        metrics.decisions.labels(state).inc()
        metrics.check_seconds.observe(time.perf_counter() - started)
        return response

    async def _check(self, request: external_auth_pb2.CheckRequest) -> tuple[external_auth_pb2.CheckResponse, str]:
        http = request.attributes.request.http
        try:
            try:
                headers = request_headers(http)  # Envoy sends header names in lower case
                client, user = identify(self._settings, headers, self._service.client_by_key)
                # The path says which API (and, on Azure-style routes, which model): how to estimate and meter.
                completion = parse_body(http.raw_body or http.body.encode(), http.path)
            except InvalidRequest as exc:
                raise Rejected(invalid_request(self._settings, str(exc)), "invalid") from None
        except Rejected as rejected:
            code = code_pb2.UNAUTHENTICATED if rejected.denial.status == 401 else code_pb2.INVALID_ARGUMENT
            return denied(rejected.denial, code), rejected.state
        request_id = (headers.get("x-request-id") or http.id or str(uuid.uuid4()))[:256]
        try:
            decision = await self._service.check(user, request_id, completion)
        except InvalidRequest as exc:  # the request id holds already: a reused id, never a pass
            return denied(invalid_request(self._settings, str(exc)), code_pb2.INVALID_ARGUMENT), "invalid"
        except StoreUnavailable as exc:
            policy = self._settings.on_store_error
            metrics = self._service.metrics
            metrics.store_errors.labels(policy).inc()
            # One line per decision taken without the store, naming the request (a fail-open one goes unmetered).
            log.error("store unavailable; on_store_error=%s: %s", policy, exc, extra={"request_id": request_id})
            if policy != "allow":
                metrics.decisions.labels("error").inc()
                raise
            # Let through unmetered, but the upstream still learns the user from quotagate alone, never from
            # the client (a usage report, e.g. LiteLLM's callback, can then charge it), and never gets the
            # client's key.
            upstream, remove = self._upstream_headers(user.user_id, headers, [])
            answer = external_auth_pb2.OkHttpResponse(headers=upstream, headers_to_remove=remove)
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=answer), (
                "error"
            )
        if not decision.allowed:
            now = self._service.clock.now()
            purchase_url = self._service.links.purchase_url(user.user_id, now)
            balance_url = self._service.links.balance_url(user.user_id, now)
            denial = quota_denial(decision, self._settings, now, purchase_url, balance_url)
            code = code_pb2.PERMISSION_DENIED if denial.status == 403 else code_pb2.RESOURCE_EXHAUSTED
            return denied(denial, code), decision.state.value
        return self._allowed(decision, user.user_id, request_id, client, completion, headers), decision.state.value

    def _upstream_headers(
        self, user_id: str, headers: Mapping[str, str], routing: list[str]
    ) -> tuple[list[base_pb2.HeaderValueOption], list[str]]:
        """What the upstream request gets and loses, however it was let through: the user as quotagate knows
        it, the upstream's own key instead of the client's, and none of the client's x-quota-* headers (only
        quotagate speaks there; `routing` names the ones Check sets itself)."""
        upstream = [_header("x-quota-user", user_id), *(_header(name, "1") for name in routing)]
        remove: list[str] = []
        if self._settings.upstream_api_key:
            # The upstream (LiteLLM) gets its own key, never the client's.
            upstream.append(_header("authorization", f"Bearer {self._settings.upstream_api_key}"))
        else:
            remove.append("authorization")
        own = {"x-quota-user", *routing}
        remove.extend(name for name in headers if name.startswith(QUOTA_HEADER_PREFIX) and name not in own)
        return upstream, remove

    def _allowed(
        self,
        decision: Decision,
        user_id: str,
        request_id: str,
        client: Client,
        completion: CompletionRequest | None,
        headers: Mapping[str, str],
    ) -> external_auth_pb2.CheckResponse:
        routing: list[str] = []
        # A notice is written as one more chat chunk or chat message text: only chat completions can carry one.
        notice = (
            decision.warn
            and self._settings.notices.in_conversation
            and completion is not None
            and completion.api is ApiKind.CHAT
        )
        if completion is not None and completion.needs_usage_asked:
            # Routes the request to where ext_proc also sees the request (envoyconf), to ask for the usage.
            routing.append(ASK_USAGE_HEADER)
        elif completion is not None and decision.reserved and (notice or not decision.settles_unseen):
            # Routes the response to the ext_proc that holds it until the charge lands (or the notice is in);
            # any other response is only watched, and its charge lands just after it.
            routing.append(SETTLE_FIRST_HEADER)
        upstream, remove = self._upstream_headers(user_id, headers, routing)
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
            # Every request with an api is metered: ext_proc charges it from the answer's usage.
            fields["api"].string_value = completion.api.value
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
