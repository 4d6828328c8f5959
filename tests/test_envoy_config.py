"""The rendered Envoy configs (and the committed envoy/envoy.yaml) pass the real `envoy --mode validate`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import subprocess
from typing import Any

import certifi
import pytest
import yaml
from test_admin_mtls import _issue

from quotagate.core.estimate import ApiKind, api_of
from quotagate.envoyconf import (
    ASK_USAGE_HEADER,
    AUTHZ_CLUSTER,
    EXT_PROC_FILTER,
    EXTPROC_CLUSTER,
    HTTP_CLUSTER,
    METERED_PATHS_REGEX,
    MODELS_PATH_REGEX,
    PRODUCTION_OPTIONS,
    RATELIMIT_CLUSTER,
    RATELIMIT_DOMAIN,
    SETTLE_FIRST_HEADER,
    UPSTREAM_CLUSTER,
    USER_PAGES_PREFIX,
    WATCH_FILTER,
    EnvoyOptions,
    build_envoy_config,
    main,
    render_envoy_config,
    tokens_descriptor,
    write_envoy_config,
)
from quotagate.procs import envoy_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCTION_YAML = REPO_ROOT / "envoy" / "envoy.yaml"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's validate mode opens trusted_ca files: certifi's bundle (installed with httpx) always exists.
CA_BUNDLE = certifi.where()

OPTION_SETS: dict[str, EnvoyOptions] = {
    "defaults": EnvoyOptions(upstream_host="127.0.0.1", upstream_port=8000),
    "production": PRODUCTION_OPTIONS,
    "fail-open-tls-hostname": EnvoyOptions(
        upstream_host="api.example.com",
        upstream_port=443,
        upstream_tls=True,
        authz_host="localhost",
        failure_mode_allow=True,
        status_on_error=500,
        max_request_bytes=4 * 1024 * 1024,
        authz_timeout_ms=250,
    ),
    "ipv6-verified-tls": EnvoyOptions(
        listen_host="::1",
        upstream_host="::1",
        upstream_port=8443,
        upstream_tls=True,
        upstream_ca_file=CA_BUNDLE,
    ),
}


def envoy_validate(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_valid(path: pathlib.Path) -> None:
    result = envoy_validate(path)
    assert result.returncode == 0, f"envoy rejected {path}:\n{result.stdout}\n{result.stderr}"


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    clusters: list[dict[str, Any]] = config["static_resources"]["clusters"]
    return next(c for c in clusters if c["name"] == name)


def endpoint(c: dict[str, Any]) -> dict[str, Any]:
    (lb_endpoint,) = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address: dict[str, Any] = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address


def http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_rendered_config_validates(name: str, tmp_path: pathlib.Path) -> None:
    opts = OPTION_SETS[name]
    path = write_envoy_config(opts, tmp_path / "conf" / "envoy.yaml")
    assert path.is_file()
    assert_valid(path)

    config = yaml.safe_load(path.read_text())
    admin = config["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": opts.admin_port}
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": opts.listen_host, "port_value": opts.listen_port}

    filters = http_filters(config)
    expected = [
        "envoy.filters.http.ext_authz",
        EXT_PROC_FILTER,
        WATCH_FILTER,
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]
    if not opts.ext_proc:
        expected.remove(EXT_PROC_FILTER)
        expected.remove(WATCH_FILTER)
    if not opts.rate_limit:
        expected.remove("envoy.filters.http.ratelimit")
    assert [f["name"] for f in filters] == expected
    authz = filters[0]["typed_config"]
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == AUTHZ_CLUSTER
    assert authz["transport_api_version"] == "V3"
    assert authz["with_request_body"] == {
        "max_request_bytes": opts.max_request_bytes,
        "allow_partial_message": False,
        "pack_as_bytes": True,
    }
    assert authz["failure_mode_allow"] is opts.failure_mode_allow
    assert authz["status_on_error"] == {"code": opts.status_on_error}
    assert authz["include_peer_certificate"] is False

    authz_cluster = cluster(config, AUTHZ_CLUSTER)
    protocol = authz_cluster["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert protocol["explicit_http_config"] == {"http2_protocol_options": {}}
    assert authz_cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 100_000

    upstream = cluster(config, UPSTREAM_CLUSTER)
    up_protocol = upstream["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert "http2_protocol_options" not in up_protocol["explicit_http_config"]
    assert ("transport_socket" in upstream) is opts.upstream_tls


def test_cluster_type_follows_host_kind() -> None:
    config = yaml.safe_load(render_envoy_config(OPTION_SETS["fail-open-tls-hostname"]))
    assert cluster(config, UPSTREAM_CLUSTER)["type"] == "STRICT_DNS"
    assert cluster(config, AUTHZ_CLUSTER)["type"] == "STRICT_DNS"
    tls = cluster(config, UPSTREAM_CLUSTER)["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"

    config = yaml.safe_load(render_envoy_config(OPTION_SETS["defaults"]))
    assert cluster(config, UPSTREAM_CLUSTER)["type"] == "STATIC"
    assert cluster(config, AUTHZ_CLUSTER)["type"] == "STATIC"


def test_metered_routes_go_upstream_with_long_timeout_and_everything_else_gets_envoys_404() -> None:
    config = yaml.safe_load(render_envoy_config(OPTION_SETS["defaults"]))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["codec_type"] == "AUTO"
    assert hcm["generate_request_id"] is True
    # Envoy makes the id of every request itself: no peer is internal, so no client's x-request-id is kept.
    assert (hcm["preserve_external_request_id"], hcm["use_remote_address"]) == (False, True)
    assert hcm["internal_address_config"] == {"cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}]}
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    pages, ask_usage, settle_first, route, models, unknown = vhost["routes"]
    metered = {"safe_regex": {"regex": METERED_PATHS_REGEX}}
    assert route["match"] == metered
    assert route["route"] == ask_usage["route"] == settle_first["route"]
    assert route["route"] == {"cluster": UPSTREAM_CLUSTER, "timeout": "300s"}
    # Streams Check wants asked for their usage: ext_proc sees the request there (and only there), and the
    # routing header does not reach the upstream. Only on metered paths: the header opens no other path.
    assert ask_usage["match"]["headers"] == [{"name": ASK_USAGE_HEADER, "present_match": True}]
    assert ask_usage["match"]["safe_regex"] == settle_first["match"]["safe_regex"] == metered["safe_regex"]
    assert ask_usage["request_headers_to_remove"] == [ASK_USAGE_HEADER, SETTLE_FIRST_HEADER]
    overrides = ask_usage["typed_per_filter_config"][EXT_PROC_FILTER]["overrides"]
    assert overrides["processing_mode"]["request_header_mode"] == "SEND"
    # Both ext_proc filters see every request's headers: that tells quotagate the request went on after Check
    # (a hold whose request never did is released when it expires, not charged).
    for name in (EXT_PROC_FILTER, WATCH_FILTER):
        ext_proc = next(f for f in http_filters(config) if f["name"] == name)["typed_config"]
        assert ext_proc["processing_mode"]["request_header_mode"] == "SEND"
    # Answers that wait for their charge (or carry a notice) go to the same filter; all else is only watched.
    assert settle_first["match"]["headers"] == [{"name": SETTLE_FIRST_HEADER, "present_match": True}]
    assert settle_first["request_headers_to_remove"] == [SETTLE_FIRST_HEADER]
    off = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    assert ask_usage["typed_per_filter_config"][WATCH_FILTER] == off
    assert settle_first["typed_per_filter_config"] == {WATCH_FILTER: off}
    assert route["typed_per_filter_config"] == {EXT_PROC_FILTER: off}
    # Listing models: GET only, free (no ext_proc), but Check stays on, so a blocked user gets 429 there too.
    assert models["match"]["safe_regex"] == {"regex": MODELS_PATH_REGEX}
    assert models["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert models["route"]["cluster"] == UPSTREAM_CLUSTER
    assert models["typed_per_filter_config"] == {EXT_PROC_FILTER: off, WATCH_FILTER: off}
    # Every other path: Envoy's own OpenAI-style 404; nothing reaches the upstream or asks quotagate.
    assert unknown["match"] == {"prefix": "/"}
    assert "route" not in unknown
    assert unknown["direct_response"]["status"] == 404
    error = json.loads(unknown["direct_response"]["body"]["inline_string"])["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_url")
    assert error["message"]
    assert unknown["response_headers_to_add"][0]["header"] == {"key": "content-type", "value": "application/json"}
    assert set(unknown["typed_per_filter_config"]) == {
        "envoy.filters.http.ext_authz",
        EXT_PROC_FILTER,
        WATCH_FILTER,
        "envoy.filters.http.ratelimit",
    }
    watch = next(f for f in http_filters(config) if f["name"] == WATCH_FILTER)["typed_config"]
    assert watch["observability_mode"] is True
    assert watch["processing_mode"]["request_header_mode"] == "SEND"
    assert watch["processing_mode"]["response_body_mode"] == "STREAMED"
    assert watch["grpc_service"] == ext_proc["grpc_service"]
    ext_authz = next(f for f in http_filters(config) if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
    assert ext_authz["clear_route_cache"] is True  # Check's header picks the route
    # The balance and purchase pages go to quotagate's HTTP port, with Check, ext_proc and the limits off.
    assert pages["match"] == {"path_separated_prefix": USER_PAGES_PREFIX}
    assert pages["route"]["cluster"] == HTTP_CLUSTER
    assert set(pages["typed_per_filter_config"]) == {
        "envoy.filters.http.ext_authz",
        EXT_PROC_FILTER,
        WATCH_FILTER,
        "envoy.filters.http.ratelimit",
    }
    assert cluster(config, HTTP_CLUSTER)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}
    }


def test_authz_timeout_rendered_as_duration() -> None:
    config = yaml.safe_load(render_envoy_config(OPTION_SETS["fail-open-tls-hostname"]))
    assert http_filters(config)[0]["typed_config"]["grpc_service"]["timeout"] == "0.250s"


def test_invalid_options_rejected() -> None:
    with pytest.raises(ValueError, match="status_on_error"):
        EnvoyOptions(upstream_host="x", upstream_port=1, status_on_error=599)
    with pytest.raises(ValueError, match="upstream_port"):
        EnvoyOptions(upstream_host="x", upstream_port=0)
    tls: dict[str, Any] = {"upstream_host": "x", "upstream_port": 1, "decision_tls": True, "decision_port": 50053}
    with pytest.raises(ValueError, match="decision_ca_file"):
        EnvoyOptions(**tls)
    with pytest.raises(ValueError, match="decision_port"):
        EnvoyOptions(**{**tls, "decision_port": 0, "decision_ca_file": CA_BUNDLE})
    with pytest.raises(ValueError, match="go together"):
        EnvoyOptions(**tls, decision_ca_file=CA_BUNDLE, decision_client_cert=CA_BUNDLE)
    with pytest.raises(ValueError, match="need decision_tls"):
        EnvoyOptions(upstream_host="x", upstream_port=1, decision_ca_file=CA_BUNDLE)


def test_production_yaml_validates() -> None:
    assert PRODUCTION_YAML.is_file()
    assert_valid(PRODUCTION_YAML)


def test_production_yaml_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--production"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("# Generated by `python -m quotagate.envoyconf --production`")
    assert yaml.safe_load(PRODUCTION_YAML.read_text()) == yaml.safe_load(generated)
    config = yaml.safe_load(generated)
    # Check, ShouldRateLimit and ext_proc's streams go to the unary server (decision_listen).
    for name in (AUTHZ_CLUSTER, RATELIMIT_CLUSTER, EXTPROC_CLUSTER):
        assert endpoint(cluster(config, name)) == {"address": "quotagate", "port_value": 50053}
    assert endpoint(cluster(config, UPSTREAM_CLUSTER)) == {"address": "litellm", "port_value": 4000}
    # Inside the compose network the decision port stays plaintext unless decision TLS is turned on.
    assert not any("transport_socket" in cluster(config, name) for name in (AUTHZ_CLUSTER, EXTPROC_CLUSTER))


def test_cli_overrides_and_output_file(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "e.yaml"
    assert main(["--production", "--failure-mode-allow", "--status-on-error", "500", "-o", str(out)]) == 0
    assert_valid(out)
    authz = http_filters(yaml.safe_load(out.read_text()))[0]["typed_config"]
    assert authz["failure_mode_allow"] is True
    assert authz["status_on_error"] == {"code": 500}


def test_envoy_validate_catches_bad_config(tmp_path: pathlib.Path) -> None:
    # Guard against a validate step that accepts anything.
    text = render_envoy_config(OPTION_SETS["defaults"]).replace("pack_as_bytes", "pack_as_bytez")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert envoy_validate(bad).returncode != 0


def test_ext_proc_has_its_own_cluster_and_per_response_body_modes() -> None:
    config = yaml.safe_load(render_envoy_config(EnvoyOptions(upstream_host="127.0.0.1", upstream_port=8000)))
    ext_proc = next(f for f in http_filters(config) if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == EXTPROC_CLUSTER != AUTHZ_CLUSTER
    assert ext_proc["allow_mode_override"] is True
    assert ext_proc["processing_mode"]["response_body_mode"] == "NONE"  # chosen per response by quotagate
    assert ext_proc["failure_mode_allow"] is True
    own = cluster(config, EXTPROC_CLUSTER)
    assert own["typed_extension_protocol_options"][HTTP_OPTIONS]["explicit_http_config"] == {
        "http2_protocol_options": {}
    }
    assert own["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000

    without = yaml.safe_load(
        render_envoy_config(EnvoyOptions(upstream_host="127.0.0.1", upstream_port=8000, ext_proc=False))
    )
    assert all(f["name"] != "envoy.filters.http.ext_proc" for f in http_filters(without))
    assert all(c["name"] != EXTPROC_CLUSTER for c in without["static_resources"]["clusters"])
    # Without ext_proc the same paths are forwarded, and the same 404 answers the rest.
    (vhost,) = without["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"]
    _, metered, models, unknown = vhost["routes"]
    assert metered["match"] == {"safe_regex": {"regex": METERED_PATHS_REGEX}}
    assert models["match"]["safe_regex"] == {"regex": MODELS_PATH_REGEX}
    assert unknown["direct_response"]["status"] == 404
    assert EXT_PROC_FILTER not in unknown["typed_per_filter_config"]


# What Envoy forwards and what the core meters are the same paths: each path the core knows matches Envoy's
# regex for its kind, and a path the core does not know matches neither.
@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/v1/embeddings",
        "/embeddings",
        "/v1/responses",
        "/responses",
        "/v1/messages",
        "/messages",
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o/completions",
        "/openai/deployments/text-embedding-3-small/embeddings",
        "/engines/gpt-4o/chat/completions",
        "/engines/openai/gpt-4o/completions",
        "/engines/e/embeddings",
        "/v1/models",
        "/models",
        "/",
        "/v1",
        "/v1/chat/completions/",
        "/v1/audio/speech",
        "/v1/messages/count_tokens",
        "/v1/responses/resp_123",
        "/openai/deployments/x/responses",
        "/openai/deployments//chat/completions",
        "/engines/x/models",
        "/v2/chat/completions",
        "/health",
        "/key/generate",
    ],
)
def test_envoys_paths_are_the_paths_the_core_meters(path: str) -> None:
    kind, _ = api_of(path)
    metered = re.fullmatch(METERED_PATHS_REGEX, path) is not None
    models = re.fullmatch(MODELS_PATH_REGEX, path) is not None
    assert metered == (kind not in (ApiKind.MODELS, ApiKind.OTHER))
    assert models == (kind is ApiKind.MODELS)


def test_rate_limits_count_requests_and_tokens_per_authenticated_user() -> None:
    config = yaml.safe_load(render_envoy_config(EnvoyOptions(upstream_host="127.0.0.1", upstream_port=8000)))
    ratelimit = next(f for f in http_filters(config) if f["name"] == "envoy.filters.http.ratelimit")["typed_config"]
    assert ratelimit["domain"] == RATELIMIT_DOMAIN
    assert ratelimit["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == RATELIMIT_CLUSTER
    assert ratelimit["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    # The tokens a completion used are added by ext_proc itself, to the descriptor Envoy builds here.
    requests, token_check = ratelimit["rate_limits"]
    assert requests["actions"] == [{"request_headers": {"header_name": "x-quota-user", "descriptor_key": "user"}}]
    assert token_check["hits_addend"] == {"number": 0}
    kind, user = token_check["actions"]
    assert (kind["generic_key"]["descriptor_key"], kind["generic_key"]["descriptor_value"]) == tokens_descriptor("u")[0]
    assert user["request_headers"]["descriptor_key"] == tokens_descriptor("u")[1][0]


def test_decision_tls_encrypts_every_call_to_the_decision_port_and_envoy_accepts_it(tmp_path: pathlib.Path) -> None:
    ca = _issue("quotagate test CA", None, ca=True)
    files = {"ca.pem": ca.cert}
    client = _issue("envoy", ca)
    files.update({"client.pem": client.cert, "client.key": client.key})
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "envoy.yaml"
    flags = ["--decision-tls", "--decision-ca-file", str(tmp_path / "ca.pem"), "--decision-client-cert"]
    flags += [str(tmp_path / "client.pem"), "--decision-client-key", str(tmp_path / "client.key")]
    assert main(["--production", *flags, "-o", str(out)]) == 0
    assert_valid(out)  # Envoy loads the certificate and key, and knows every field
    config = yaml.safe_load(out.read_text())
    for name in (AUTHZ_CLUSTER, EXTPROC_CLUSTER, RATELIMIT_CLUSTER):
        tls = cluster(config, name)["transport_socket"]["typed_config"]
        assert tls["sni"] == "quotagate"
        context = tls["common_tls_context"]
        assert context["alpn_protocols"] == ["h2"]
        validation = context["validation_context"]
        assert validation["trusted_ca"] == {"filename": str(tmp_path / "ca.pem")}
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "quotagate"}}]
        (certificate,) = context["tls_certificates"]
        assert certificate["certificate_chain"] == {"filename": str(tmp_path / "client.pem")}
        assert certificate["private_key"] == {"filename": str(tmp_path / "client.key")}
    # The LLM upstream and quotagate's HTTP port are not the decision port.
    assert "transport_socket" not in cluster(config, UPSTREAM_CLUSTER)
    assert "transport_socket" not in cluster(config, HTTP_CLUSTER)


def test_decision_tls_to_an_address_pins_the_ip_and_sends_no_sni() -> None:
    opts = EnvoyOptions("127.0.0.1", 8000, decision_port=50053, decision_tls=True, decision_ca_file=CA_BUNDLE)
    tls = cluster(build_envoy_config(opts), AUTHZ_CLUSTER)["transport_socket"]["typed_config"]
    assert "sni" not in tls and "tls_certificates" not in tls["common_tls_context"]
    san = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}]
    named = dataclasses.replace(opts, decision_sni="decisions.internal")
    tls = cluster(build_envoy_config(named), AUTHZ_CLUSTER)["transport_socket"]["typed_config"]
    assert tls["sni"] == "decisions.internal"
