"""Envoy v3 bootstrap config for quotagate: one listener, ext_authz → quotagate, router → the LLM upstream.

The config is built as a plain dict and dumped with ``yaml.safe_dump`` so every value is quoted correctly.
Header rewriting (dropping the client key, adding the upstream key) is done by quotagate through the
ext_authz OkHttpResponse, so nothing here touches headers.

``python -m quotagate.envoyconf --production > envoy/envoy.yaml`` regenerates the docker-compose config.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import pathlib
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from envoy.type.v3 import http_status_pb2

from quotagate.config import DEFAULT_ENVOY_TOKEN

_ENVOY_STATUS_CODES: frozenset[int] = frozenset(v for v in http_status_pb2.StatusCode.values() if v >= 100)

__all__ = [
    "AUTHZ_CLUSTER",
    "ENVOY_TOKEN_PLACEHOLDER",
    "EXTPROC_CLUSTER",
    "EXT_PROC_FILTER",
    "HTTP_CLUSTER",
    "METERED_PATHS_REGEX",
    "MODELS_PATH_REGEX",
    "PRODUCTION_OPTIONS",
    "RATELIMIT_CLUSTER",
    "RATELIMIT_DOMAIN",
    "UNKNOWN_PATH_BODY",
    "UPSTREAM_CLUSTER",
    "USER_PAGES_PREFIX",
    "WATCH_FILTER",
    "EnvoyOptions",
    "build_envoy_config",
    "main",
    "render_envoy_config",
    "write_envoy_config",
]

AUTHZ_CLUSTER = "quotagate_authz"
EXTPROC_CLUSTER = "quotagate_extproc"
RATELIMIT_CLUSTER = "quotagate_ratelimit"
RATELIMIT_DOMAIN = "quotagate"
UPSTREAM_CLUSTER = "upstream"
HTTP_CLUSTER = "quotagate_http"
# Served by quotagate's HTTP port, not the LLM upstream: the balance page and the purchase link.
USER_PAGES_PREFIX = "/v1/quota"
# Check sets it on a stream that must be asked for its usage: Envoy then routes the request (again, after Check)
# to the route where ext_proc also sees the request; every other request skips that round trip.
ASK_USAGE_HEADER = "x-quota-ask-usage"
# Check sets it when the answer must wait for the charge (near a threshold, a notice due): Envoy then routes the
# request to the ext_proc that holds each answer. Every other response is only watched (WATCH_FILTER), in
# observability mode, so the client never waits for quotagate after Check.
SETTLE_FIRST_HEADER = "x-quota-settle-first"
# What envoy/envoy.yaml carries in place of Envoy's token (a static config cannot read the environment):
# envoy/start.sh puts QUOTAGATE_ENVOY_TOKEN there when the container starts.
ENVOY_TOKEN_PLACEHOLDER = "@QUOTAGATE_ENVOY_TOKEN@"
# The paths Envoy forwards to the LLM upstream (RE2, matched against the whole path without its query). Metered:
# OpenAI's chat completions, completions, embeddings and Responses and Anthropic's Messages, with and without
# /v1, and the Azure-style routes that name the model in the path (greedy, like LiteLLM's `{model:path}`).
# Factored so that RE2's program stays under Envoy's default size limit (100).
METERED_PATHS_REGEX = (
    "(?:/v1)?/(?:responses|messages)|(?:/v1|/(?:openai/deployments|engines)/.+)?/(?:(?:chat/)?completions|embeddings)"
)
# Free, but behind Check (GET only).
MODELS_PATH_REGEX = "(?:/v1)?/models"
# What every other path gets from Envoy itself, OpenAI-style.
UNKNOWN_PATH_BODY = json.dumps(
    {
        "error": {
            "message": "Unknown path: this gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings, "
            "/v1/responses, /v1/messages and GET /v1/models.",
            "type": "invalid_request_error",
            "code": "unknown_url",
        }
    }
)
# The filters' names, which routes use to turn them on or off.
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
WATCH_FILTER = "quotagate.ext_proc.watch"

_TYPE_URL = "type.googleapis.com/"
_HCM_TYPE = _TYPE_URL + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_AUTHZ_TYPE = _TYPE_URL + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
_EXT_PROC_TYPE = _TYPE_URL + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_EXT_PROC_ROUTE_TYPE = _TYPE_URL + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_RATELIMIT_TYPE = _TYPE_URL + "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_ROUTER_TYPE = _TYPE_URL + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS_TYPE = _TYPE_URL + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_TYPE = _TYPE_URL + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_FILTER_CONFIG_TYPE = _TYPE_URL + "envoy.config.route.v3.FilterConfig"

# Streamed completions can run for minutes; the route timeout covers the whole response.
_ROUTE_TIMEOUT = "300s"
# Envoy's default circuit breakers (1,024 requests) cause overflow 503s on the authz cluster under load.
_AUTHZ_CIRCUIT_LIMIT = 100_000
# ext_proc holds one gRPC stream per request in flight for as long as its response streams.
_EXTPROC_CIRCUIT_LIMIT = 100_000


@dataclass(frozen=True)
class EnvoyOptions:
    """Everything that varies between the test, `quotagate up` and docker-compose Envoy configs."""

    upstream_host: str
    upstream_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    authz_host: str = "127.0.0.1"
    authz_port: int = 50051
    # quotagate's unary server (decision_listen) for Check, ShouldRateLimit and ext_proc; 0: all to authz_port.
    decision_port: int = 0
    upstream_tls: bool = False
    failure_mode_allow: bool = False
    status_on_error: int = 503
    max_request_bytes: int = 1048576
    authz_timeout_ms: int = 2000
    # PEM bundle for verifying the upstream's certificate; without it Envoy encrypts but does not verify.
    upstream_ca_file: str | None = None
    # Usage capture from the response bodies (ext_proc); off for deployments that report usage otherwise.
    ext_proc: bool = True
    # Requests and tokens per window through Envoy's rate-limit filter (quotagate's ShouldRateLimit).
    rate_limit: bool = True
    rate_limit_timeout_ms: int = 1000
    # quotagate's HTTP port, which serves the balance and purchase pages through Envoy under /v1/quota.
    # The host defaults to authz_host.
    http_port: int = 8080
    http_host: str = ""
    # quotagate's envoy_token (QUOTAGATE_ENVOY_TOKEN), sent on every gRPC call Envoy makes to it.
    envoy_token: str = DEFAULT_ENVOY_TOKEN
    # TLS to the decision port (quotagate's decision.tls): the CA that signed quotagate's certificate, and for
    # mutual TLS (decision.tls.client_ca) Envoy's own certificate and key, all PEM files as Envoy sees them.
    decision_tls: bool = False
    decision_ca_file: str | None = None
    decision_client_cert: str | None = None
    decision_client_key: str | None = None
    # The name quotagate's certificate must carry (and the SNI sent); default authz_host.
    decision_sni: str = ""

    def __post_init__(self) -> None:
        for name in ("listen_port", "admin_port", "authz_port", "upstream_port", "http_port"):
            port: int = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port (1-65535), got {port}")
        if not 0 <= self.decision_port < 65536:
            raise ValueError(f"decision_port must be a TCP port (1-65535) or 0, got {self.decision_port}")
        # Envoy only accepts the codes listed in envoy.type.v3.StatusCode (e.g. 503, but not 599).
        if self.status_on_error not in _ENVOY_STATUS_CODES:
            raise ValueError(f"status_on_error {self.status_on_error} is not a code Envoy accepts")
        if self.max_request_bytes <= 0:
            raise ValueError("max_request_bytes must be positive")
        if self.authz_timeout_ms <= 0:
            raise ValueError("authz_timeout_ms must be positive")
        if not self.envoy_token or not all("!" <= c <= "~" for c in self.envoy_token):
            raise ValueError("envoy_token must be printable ASCII without spaces (it is sent as a header)")
        self._check_decision_tls()

    def _check_decision_tls(self) -> None:
        tls_files = (self.decision_ca_file, self.decision_client_cert, self.decision_client_key, self.decision_sni)
        if not self.decision_tls:
            if any(tls_files):
                raise ValueError("decision_ca_file, decision_client_cert/key and decision_sni need decision_tls")
            return
        if not self.decision_port:
            # With decision_port 0 every call goes to the grpc.aio port, which decision.tls does not cover.
            raise ValueError("decision_tls needs decision_port (quotagate's decision_listen port)")
        if not self.decision_ca_file:
            # Without it Envoy would send its token to whoever answers on the port.
            raise ValueError("decision_tls needs decision_ca_file, the CA that signed quotagate's certificate")
        if (self.decision_client_cert is None) != (self.decision_client_key is None):
            raise ValueError("decision_client_cert and decision_client_key go together (mutual TLS)")


# docker-compose: quotagate and LiteLLM are reached by their service names.
PRODUCTION_OPTIONS = EnvoyOptions(
    listen_host="0.0.0.0",
    listen_port=10000,
    admin_port=9901,
    authz_host="quotagate",
    authz_port=50051,
    decision_port=50053,
    upstream_host="litellm",
    upstream_port=4000,
    envoy_token=ENVOY_TOKEN_PLACEHOLDER,
)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration_ms(ms: int) -> str:
    # Envoy's JSON mapping of Duration wants seconds with a fractional part, e.g. "0.250s".
    return f"{ms // 1000}.{ms % 1000:03d}s"


def _cluster(name: str, host: str, port: int, connect_timeout: str) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        # STATIC needs an IP; STRICT_DNS re-resolves names such as docker-compose service hosts.
        "type": "STATIC" if _is_ip_literal(host) else "STRICT_DNS",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }
    if not _is_ip_literal(host):
        # "localhost" may resolve to ::1 first while the service only listens on IPv4.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _grpc_service(cluster: str, opts: EnvoyOptions) -> dict[str, Any]:
    """A gRPC service on quotagate, with the token that tells quotagate the call comes from this Envoy."""
    return {
        "envoy_grpc": {"cluster_name": cluster},
        "initial_metadata": [{"key": "authorization", "value": f"Bearer {opts.envoy_token}"}],
    }


def _grpc_cluster(name: str, opts: EnvoyOptions, limit: int) -> dict[str, Any]:
    # Every call Envoy makes goes to quotagate's decision port when it has one.
    cluster = _cluster(name, opts.authz_host, opts.decision_port or opts.authz_port, "1s")
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS_KEY: {
            "@type": _HTTP_OPTIONS_TYPE,
            # gRPC needs HTTP/2 to the service.
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": limit,
                "max_pending_requests": limit,
                "max_requests": limit,
            }
        ]
    }
    if opts.decision_tls:
        cluster["transport_socket"] = _decision_transport_socket(opts)
    return cluster


def _decision_transport_socket(opts: EnvoyOptions) -> dict[str, Any]:
    """TLS to quotagate's decision port: ALPN h2 (gRPC over TLS needs it), quotagate's certificate verified
    against decision_ca_file and pinned to its name, and Envoy's certificate when quotagate asks for one."""
    name = opts.decision_sni or opts.authz_host
    san_type = "IP_ADDRESS" if _is_ip_literal(name) else "DNS"
    context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "validation_context": {
            "trusted_ca": {"filename": opts.decision_ca_file},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": name}}],
        },
    }
    if opts.decision_client_cert is not None and opts.decision_client_key is not None:
        context["tls_certificates"] = [
            {
                "certificate_chain": {"filename": opts.decision_client_cert},
                "private_key": {"filename": opts.decision_client_key},
            }
        ]
    tls: dict[str, Any] = {"@type": _TLS_TYPE, "common_tls_context": context}
    if san_type == "DNS":
        tls["sni"] = name
    return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def _authz_cluster(opts: EnvoyOptions) -> dict[str, Any]:
    return _grpc_cluster(AUTHZ_CLUSTER, opts, _AUTHZ_CIRCUIT_LIMIT)


def _extproc_cluster(opts: EnvoyOptions) -> dict[str, Any]:
    # A cluster of its own: long-lived ext_proc streams must never use up the Check cluster's limits.
    return _grpc_cluster(EXTPROC_CLUSTER, opts, _EXTPROC_CIRCUIT_LIMIT)


def _ratelimit_cluster(opts: EnvoyOptions) -> dict[str, Any]:
    return _grpc_cluster(RATELIMIT_CLUSTER, opts, _AUTHZ_CIRCUIT_LIMIT)


def tokens_descriptor(user_id: str) -> tuple[tuple[str, str], ...]:
    """The token windows' descriptor as Envoy builds it (_user_descriptor): ext_proc adds the tokens each
    completion used to the same counters."""
    return (("kind", "tokens"), ("user", user_id))


def _user_descriptor(*, tokens: bool) -> list[dict[str, Any]]:
    # x-quota-user is set by quotagate's Check, so it names an authenticated user (a client cannot forge it).
    user = {"request_headers": {"header_name": "x-quota-user", "descriptor_key": "user"}}
    if not tokens:
        return [user]
    (kind, value), _ = tokens_descriptor("")
    return [{"generic_key": {"descriptor_key": kind, "descriptor_value": value}}, user]


def _ratelimit_filter(opts: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": _RATELIMIT_TYPE,
            "domain": RATELIMIT_DOMAIN,
            "timeout": _duration_ms(opts.rate_limit_timeout_ms),
            # The monthly quota (Check) fails closed; rate limits are a second line and fail open.
            "failure_mode_deny": False,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": _grpc_service(RATELIMIT_CLUSTER, opts),
                "transport_api_version": "V3",
            },
            # Filter-level rate_limits: Envoy 1.40 ignores hits_addend in route-level ones (ENVOY-NOTES).
            "rate_limits": [
                # Requests per window per user.
                {"actions": _user_descriptor(tokens=False)},
                # Tokens per window per user: checked (hits 0) before the request. ext_proc adds the tokens a
                # completion used to the same windows itself: a second call from Envoy when the stream is done
                # (apply_on_stream_done) cost quotagate as much CPU as a Check.
                {"actions": _user_descriptor(tokens=True), "hits_addend": {"number": 0}},
            ],
        },
    }


def _ext_proc_config(opts: EnvoyOptions, **settings: Any) -> dict[str, Any]:
    """What both ext_proc filters share: the service, failing open, and what Check learnt (user, model, prompt
    size, whether to ask for usage), which reaches ext_proc through the forwarded metadata."""
    return {
        "@type": _EXT_PROC_TYPE,
        "grpc_service": {**_grpc_service(EXTPROC_CLUSTER, opts), "timeout": "5s"},
        # Usage capture must not break a chat: if quotagate is gone mid-stream the client still gets its
        # answer, and the reservation is charged at its estimate when it expires.
        "failure_mode_allow": True,
        **settings,
        "metadata_options": {"forwarding_namespaces": {"untyped": [_EXT_AUTHZ_NAMESPACE]}},
    }


def _ext_proc_filter(opts: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": _ext_proc_config(
            opts,
            # The response body mode is chosen per response from its content type (STREAMED for SSE,
            # BUFFERED for JSON, else NONE). The request headers tell quotagate that Envoy went on with the
            # request after Check (service.mark_forwarded); the body is sent only on the route for streams
            # that must be asked for their usage. The rest comes with Check's metadata.
            processing_mode=_processing_mode(request_headers=True),
            allow_mode_override=True,
            message_timeout="2s",
        ),
    }


def _watch_filter(opts: EnvoyOptions) -> dict[str, Any]:
    """The same service in observability mode: Envoy sends the response and does not wait for any answer, so
    it adds nothing to the client's latency. Used where nothing needs changing and the answer need not wait
    for the charge (far from every threshold, the common case)."""
    return {
        "name": WATCH_FILTER,
        "typed_config": _ext_proc_config(
            opts,
            observability_mode=True,
            stat_prefix="watch",
            # No mode_override in observability mode: every response body is streamed to quotagate, which
            # ends the stream itself as soon as it has seen what it needs (the headers of an answer it does
            # not read, or the body's end). The request headers, which Envoy does not wait for either, tell
            # quotagate the request went on after Check (service.mark_forwarded).
            processing_mode={**_processing_mode(request_headers=True), "response_body_mode": "STREAMED"},
        ),
    }


def _processing_mode(*, request_headers: bool) -> dict[str, str]:
    return {
        "request_header_mode": "SEND" if request_headers else "SKIP",
        "response_header_mode": "SEND",
        # Asked for per request (mode_override), only when a stream must be asked for its usage.
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


def _upstream_routes(opts: EnvoyOptions) -> list[dict[str, Any]]:
    """The routes to the LLM upstream: the metered APIs, the free model list, and Envoy's own 404 for every
    other path, so nothing reaches the upstream that quotagate does not meter (core.estimate.api_of reads the
    same paths)."""
    route = {"cluster": UPSTREAM_CLUSTER, "timeout": _ROUTE_TIMEOUT}
    metered_path = {"safe_regex": {"regex": METERED_PATHS_REGEX}}
    if not opts.ext_proc:
        return [{"match": metered_path, "route": route}, _models_route({}), _unknown_path_route(opts)]
    # ExtProcPerRoute, not the generic FilterConfig: Envoy settles which filters a request has from the route
    # it first matched, before Check's headers pick the final route; ext_proc reads its own per-route
    # config when the request reaches it.
    disabled = {"@type": _EXT_PROC_ROUTE_TYPE, "disabled": True}
    # A stream Check wants asked for its usage: ext_proc sees the request headers, and reads the body from there.
    ask_usage = {
        "match": {**metered_path, "headers": [{"name": ASK_USAGE_HEADER, "present_match": True}]},
        "route": route,
        "request_headers_to_remove": [ASK_USAGE_HEADER, SETTLE_FIRST_HEADER],
        "typed_per_filter_config": {
            EXT_PROC_FILTER: {
                "@type": _EXT_PROC_ROUTE_TYPE,
                "overrides": {"processing_mode": _processing_mode(request_headers=True)},
            },
            WATCH_FILTER: disabled,
        },
    }
    # An answer that must wait for its charge, or carry a notice: ext_proc holds the response.
    settle_first = {
        "match": {**metered_path, "headers": [{"name": SETTLE_FIRST_HEADER, "present_match": True}]},
        "route": route,
        "request_headers_to_remove": [SETTLE_FIRST_HEADER],
        "typed_per_filter_config": {WATCH_FILTER: disabled},
    }
    # Every other metered answer is only watched.
    default = {
        "match": metered_path,
        "route": route,
        "typed_per_filter_config": {EXT_PROC_FILTER: disabled},
    }
    models = _models_route({EXT_PROC_FILTER: disabled, WATCH_FILTER: disabled})
    return [ask_usage, settle_first, default, models, _unknown_path_route(opts)]


def _models_route(per_filter: dict[str, Any]) -> dict[str, Any]:
    # Listing models costs nothing and has no usage to read, but goes through Check: a blocked user gets 429.
    return {
        "match": {
            "safe_regex": {"regex": MODELS_PATH_REGEX},
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "route": {"cluster": UPSTREAM_CLUSTER, "timeout": "30s"},
        **({"typed_per_filter_config": per_filter} if per_filter else {}),
    }


def _unknown_path_route(opts: EnvoyOptions) -> dict[str, Any]:
    """Envoy's own 404 for every path that is not metered: nothing reaches the upstream, and neither Check nor
    the rate limits are asked (there is nothing to decide)."""
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": UNKNOWN_PATH_BODY}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": _quotagate_filters_off(opts),
    }


def _quotagate_filters_off(opts: EnvoyOptions) -> dict[str, Any]:
    """Per-route config that turns off Check, both ext_proc filters and the rate limits."""
    disabled = {"@type": _FILTER_CONFIG_TYPE, "disabled": True}
    per_filter = {"envoy.filters.http.ext_authz": disabled}
    if opts.ext_proc:
        per_filter[EXT_PROC_FILTER] = disabled
        per_filter[WATCH_FILTER] = disabled
    if opts.rate_limit:
        per_filter["envoy.filters.http.ratelimit"] = disabled
    return per_filter


def _upstream_cluster(opts: EnvoyOptions) -> dict[str, Any]:
    cluster = _cluster(UPSTREAM_CLUSTER, opts.upstream_host, opts.upstream_port, "2s")
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS_KEY: {
            "@type": _HTTP_OPTIONS_TYPE,
            # LiteLLM and the demo server speak HTTP/1.1 only.
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    if opts.upstream_tls:
        tls: dict[str, Any] = {"@type": _TLS_TYPE}
        hostname = not _is_ip_literal(opts.upstream_host)
        if hostname:
            tls["sni"] = opts.upstream_host
        if opts.upstream_ca_file is not None:
            validation: dict[str, Any] = {"trusted_ca": {"filename": opts.upstream_ca_file}}
            if hostname:
                # A trusted CA alone accepts any name it signed; pin the certificate to the upstream host.
                validation["match_typed_subject_alt_names"] = [
                    {"san_type": "DNS", "matcher": {"exact": opts.upstream_host}}
                ]
            tls["common_tls_context"] = {"validation_context": validation}
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def _ext_authz_filter(opts: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _EXT_AUTHZ_TYPE,
            "grpc_service": {**_grpc_service(AUTHZ_CLUSTER, opts), "timeout": _duration_ms(opts.authz_timeout_ms)},
            "transport_api_version": "V3",
            # quotagate reads the model and max_tokens from the JSON body; a partial body is useless to it,
            # so a larger request is refused with 413 instead.
            "with_request_body": {
                "max_request_bytes": opts.max_request_bytes,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
            "failure_mode_allow": opts.failure_mode_allow,
            # Check's headers choose the route, and so which ext_proc sees the response: match the routes again.
            "clear_route_cache": opts.ext_proc,
            # Without this Envoy answers 403 when quotagate is unreachable, which looks like a quota denial.
            "status_on_error": {"code": opts.status_on_error},
            "include_peer_certificate": False,
            # Header values as sent (header_map): Envoy's headers map joins repeated headers with commas and
            # turns bytes that are not UTF-8 into '!', so two x-user-id values or two different non-UTF-8 ones
            # would name one account there (ext_authz.request_headers refuses them).
            "encode_raw_headers": True,
        },
    }


def _user_pages_route(opts: EnvoyOptions) -> dict[str, Any]:
    # quotagate identifies the user itself here (client key and x-user-id, or a signed personal link), and
    # nothing is spent, so Check, ext_proc and the rate limits stay out of the way: a blocked user must
    # still see the balance page and buy credits.
    return {
        "match": {"path_separated_prefix": USER_PAGES_PREFIX},
        "route": {"cluster": HTTP_CLUSTER, "timeout": "30s"},
        "typed_per_filter_config": _quotagate_filters_off(opts),
    }


def _http_cluster(opts: EnvoyOptions) -> dict[str, Any]:
    return _cluster(HTTP_CLUSTER, opts.http_host or opts.authz_host, opts.http_port, "1s")


def _listener(opts: EnvoyOptions) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        # x-request-id is the correlation key shared by Check and the logs.
        "generate_request_id": True,
        # Clients cannot choose the id (it keys their reservation and ledger row), but they get it back for
        # support questions. Envoy replaces a client's id only on a request it takes as external, which needs
        # use_remote_address; and with no internal ranges given it takes loopback and private peers (LibreChat
        # in the same network) as internal and keeps their ids. So no peer is internal: the one range listed
        # is the unspecified address, which no client can have.
        "preserve_external_request_id": False,
        "use_remote_address": True,
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}]},
        "always_set_request_id_in_response": True,
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [
                {
                    "name": "llm",
                    "domains": ["*"],
                    "routes": [_user_pages_route(opts), *_upstream_routes(opts)],
                }
            ],
        },
        "http_filters": [
            _ext_authz_filter(opts),
            *([_ext_proc_filter(opts), _watch_filter(opts)] if opts.ext_proc else []),
            # After Check and ext_proc: its users are authenticated, and ext_proc sees its 429s and releases
            # the reservation Check made.
            *([_ratelimit_filter(opts)] if opts.rate_limit else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _ROUTER_TYPE},
            },
        ],
    }
    return {
        "name": "ingress",
        "address": _socket_address(opts.listen_host, opts.listen_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm},
                ]
            }
        ],
    }


def build_envoy_config(opts: EnvoyOptions) -> dict[str, Any]:
    """The bootstrap as a dict (handy for tests that want to inspect or tweak it)."""
    return {
        "admin": {"address": _socket_address("127.0.0.1", opts.admin_port)},
        "static_resources": {
            "listeners": [_listener(opts)],
            "clusters": [
                _authz_cluster(opts),
                *([_extproc_cluster(opts)] if opts.ext_proc else []),
                *([_ratelimit_cluster(opts)] if opts.rate_limit else []),
                _http_cluster(opts),
                _upstream_cluster(opts),
            ],
        },
    }


def render_envoy_config(opts: EnvoyOptions) -> str:
    """The bootstrap as YAML text for ``envoy -c``."""
    return yaml.safe_dump(build_envoy_config(opts), sort_keys=False, default_flow_style=False)


def write_envoy_config(opts: EnvoyOptions, path: pathlib.Path) -> pathlib.Path:
    """Render the config to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_envoy_config(opts), encoding="utf-8")
    return path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m quotagate.envoyconf",
        description="Print an Envoy bootstrap config that puts quotagate (ext_authz) in front of an LLM API.",
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="start from the docker-compose settings (quotagate:50051 and :50053, litellm:4000, listener :10000)",
    )
    parser.add_argument("-o", "--output", type=pathlib.Path, help="write to this file instead of stdout")
    # default=None everywhere so that only flags given on the command line override the base options.
    parser.add_argument("--listen-host")
    parser.add_argument("--listen-port", type=int)
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--authz-host")
    parser.add_argument("--authz-port", type=int)
    parser.add_argument(
        "--decision-port", type=int, help="quotagate's decision_listen port for what Envoy calls (0: the authz port)"
    )
    parser.add_argument("--upstream-host")
    parser.add_argument("--upstream-port", type=int)
    parser.add_argument("--upstream-tls", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--failure-mode-allow", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--status-on-error", type=int)
    parser.add_argument("--max-request-bytes", type=int)
    parser.add_argument("--authz-timeout-ms", type=int)
    parser.add_argument("--upstream-ca-file", help="CA bundle to verify the upstream's TLS certificate")
    parser.add_argument("--ext-proc", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--rate-limit", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--rate-limit-timeout-ms", type=int)
    parser.add_argument("--http-host", help="quotagate's HTTP port host (default: the authz host)")
    parser.add_argument("--http-port", type=int, help="quotagate's HTTP port (balance and purchase pages)")
    parser.add_argument(
        "--decision-tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TLS to the decision port (quotagate's decision.tls); needs --decision-ca-file",
    )
    parser.add_argument("--decision-ca-file", help="PEM CA that signed quotagate's decision port certificate")
    parser.add_argument("--decision-client-cert", help="Envoy's certificate for mutual TLS (decision.tls.client_ca)")
    parser.add_argument("--decision-client-key", help="the private key of --decision-client-cert")
    parser.add_argument("--decision-sni", help="the name on quotagate's certificate (default: the authz host)")
    parser.add_argument(
        "--envoy-token",
        help=f"quotagate's envoy_token, sent on Envoy's gRPC calls (--production: {ENVOY_TOKEN_PLACEHOLDER}, "
        "which envoy/start.sh replaces with QUOTAGATE_ENVOY_TOKEN)",
    )
    args = parser.parse_args(argv)
    if not args.production and (args.upstream_host is None or args.upstream_port is None):
        parser.error("--upstream-host and --upstream-port are required without --production")
    return args


def _options_from_args(args: argparse.Namespace) -> EnvoyOptions:
    overrides: dict[str, Any] = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(EnvoyOptions)
        if getattr(args, field.name) is not None
    }
    if args.production:
        return dataclasses.replace(PRODUCTION_OPTIONS, **overrides)
    return EnvoyOptions(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        opts = _options_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown_args = shlex.join(sys.argv[1:] if argv is None else list(argv))
    header = (
        f"# Generated by `python -m quotagate.envoyconf {shown_args}`.\n"
        "# Do not edit by hand: change quotagate/envoyconf.py and regenerate.\n"
    )
    text = header + render_envoy_config(opts)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
