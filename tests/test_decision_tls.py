"""TLS and mutual TLS on the decision port (decision.tls): certificates made here (a CA, quotagate's, Envoy's, and a
client's from another CA); a real Envoy calling Check, ext_proc and ShouldRateLimit over mutual TLS; clients in
plaintext, without a certificate or with one from another CA refused; settings and start-up errors."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from harness import ENVOY_AUTH, Stack, make_settings
from served import check_request
from test_admin_mtls import Issued, _issue

from quotagate.config import ConfigError, load_settings
from quotagate.envoyconf import main as envoyconf_main
from quotagate.procs import envoy_binary
from quotagate.server import Running, start
from quotagate.unary import UnaryServer
from quotagate.unary.limits import DecisionLimits, DecisionTls
from quotagate.unary.tls import server_context
from quotagate.v1 import admin_pb2


@dataclass
class Pki:
    folder: Path
    ca: Issued
    server: Issued  # quotagate's: localhost and 127.0.0.1
    client: Issued  # Envoy's, from the CA
    stranger: Issued  # from another CA

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def tls(self, *, mutual: bool = True) -> dict[str, str]:
        """The `decision.tls` section."""
        files = {"cert": self.path("server.pem"), "key": self.path("server.key")}
        return {**files, "client_ca": self.path("ca.pem")} if mutual else files

    def decision_tls(self, *, mutual: bool = True) -> DecisionTls:
        client_ca = Path(self.path("ca.pem")) if mutual else None
        return DecisionTls(Path(self.path("server.pem")), Path(self.path("server.key")), client_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("decision-pki")
    ca = _issue("quotagate decision CA", None, ca=True)
    made = Pki(
        folder,
        ca,
        _issue("localhost", ca, server=True),
        _issue("envoy", ca),
        _issue("envoy", _issue("some other CA", None, ca=True)),
    )
    for name, issued in (("ca", ca), ("server", made.server), ("client", made.client), ("stranger", made.stranger)):
        (folder / f"{name}.pem").write_bytes(issued.cert)
        (folder / f"{name}.key").write_bytes(issued.key)
    return made


def credentials(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=client.key, certificate_chain=client.cert
    )


async def health_check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


async def refused(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_check(channel)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- settings ---------------------------------------------------------------------------------------------------


def test_decision_tls_paths_are_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / "tls" / name).write_bytes(Path(pki.path(name)).read_bytes())
    config = tmp_path / "quotagate.yaml"
    config.write_text("decision:\n  tls: {cert: tls/server.pem, key: tls/server.key, client_ca: tls/ca.pem}\n")
    cert, key = tmp_path / "tls/server.pem", tmp_path / "tls/server.key"
    assert load_settings(config, {}).decision_tls == DecisionTls(cert, key, tmp_path / "tls/ca.pem")
    config.write_text("decision:\n  tls: {cert: tls/server.pem, key: tls/server.key}\n")
    assert load_settings(config, {}).decision_tls == DecisionTls(cert, key)
    config.write_text("decision: {max_connections: 10}\n")
    assert load_settings(config, {}).decision_tls is None
    config.write_text("decision:\n  tls: {key: tls/server.key}\n")
    with pytest.raises(ConfigError, match=r"decision\.tls\.cert: required"):
        load_settings(config, {})


async def test_a_key_that_is_not_the_certificates_stops_the_start_naming_decision_tls(
    database_url: str, redis_url: str, redis_prefix: str, pki: Pki
) -> None:
    tls = {**pki.tls(), "key": pki.path("client.key")}
    settings = make_settings(database_url, redis_url, redis_prefix, decision={"tls": tls})
    with pytest.raises(OSError, match=r"decision\.tls"):
        running = await start(settings)
        await running.stop()


# -- the unary server alone -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def unary_server(tls: DecisionTls, limits: DecisionLimits | None = None) -> AsyncIterator[int]:
    server = UnaryServer(limits=limits)
    server.add_servicer(health_pb2_grpc.add_HealthServicer_to_server, health.aio.HealthServicer())
    port = await server.start("127.0.0.1", 0, ssl=server_context(tls))
    try:
        yield port
    finally:
        await server.stop(grace=1)


async def test_tls_without_client_ca_serves_clients_without_a_certificate_and_refuses_plaintext(pki: Pki) -> None:
    async with unary_server(pki.decision_tls(mutual=False)) as port:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials(pki, None)) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            await refused(plaintext)


async def test_tls_offers_h2_and_nothing_below_tls_1_2(pki: Pki) -> None:
    async with unary_server(pki.decision_tls(mutual=False)) as port:
        context = ssl.create_default_context(cafile=pki.path("ca.pem"))
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        tls_object = writer.get_extra_info("ssl_object")
        assert tls_object.selected_alpn_protocol() == "h2"
        writer.close()
    context = server_context(pki.decision_tls())
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_RENEGOTIATION


async def test_failed_handshakes_do_not_use_up_max_connections(pki: Pki) -> None:
    async with unary_server(pki.decision_tls(), DecisionLimits(max_connections=2)) as port:
        # TLS 1.3: the client's side of the handshake ends before quotagate reads its (missing) certificate.
        anonymous = ssl.create_default_context(cafile=pki.path("ca.pem"))
        for _ in range(6):
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=anonymous, server_hostname="localhost"
                )
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
        for _ in range(2):  # both places are free
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials(pki, pki.client)) as channel:
                assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING


# -- quotagate with mutual TLS ----------------------------------------------------------------------------------


@pytest.fixture
async def mutual(database_url: str, redis_url: str, redis_prefix: str, pki: Pki) -> AsyncIterator[Running]:
    running = await start(make_settings(database_url, redis_url, redis_prefix, decision={"tls": pki.tls()}))
    yield running
    await running.stop()


async def test_mutual_tls_answers_only_a_client_with_a_certificate_from_the_ca(
    mutual: Running, pki: Pki, uid: str
) -> None:
    address = f"127.0.0.1:{mutual.decision_port}"
    async with grpc.aio.secure_channel(address, credentials(pki, pki.client)) as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
        answer = await check(check_request("test-chat-key", uid), metadata=ENVOY_AUTH, timeout=10)
        assert answer.status.code == 0  # OK: the request may go on
        assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    for client in (None, pki.stranger):
        async with grpc.aio.secure_channel(address, credentials(pki, client)) as channel:
            await refused(channel)
    async with grpc.aio.insecure_channel(address) as plaintext:
        await refused(plaintext)
    # Each refusal is counted (and logged at most once per cause every 10 seconds): Envoy's side is silent.
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{mutual.http_port}/metrics")).text
    closed = re.search(r'quotagate_decision_connections_closed_total\{cause="tls_handshake"\} (\S+)', text)
    assert closed is not None and float(closed.group(1)) >= 3, text


# -- Envoy over mutual TLS --------------------------------------------------------------------------------------


async def test_envoy_calls_check_ext_proc_and_rate_limits_over_mutual_tls(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, pki: Pki, uid: str
) -> None:
    settings = make_settings(
        database_url, redis_url, redis_prefix, decision={"tls": pki.tls()},
        plans=[{"id": "decision-tls-100k", "monthly_allowance": 100_000}],
    )  # fmt: skip
    envoy_tls = {
        "decision_tls": True,
        "decision_ca_file": pki.path("ca.pem"),
        "decision_client_cert": pki.path("client.pem"),
        "decision_client_key": pki.path("client.key"),
    }
    async with Stack(settings, tmp_path, ext_proc=True, rate_limit=True, envoy_options=envoy_tls) as stack:
        response = await stack.chat(uid, completion_tokens=30)
        assert response.status_code == 200, response.text
        account = await charged(stack, uid)
        assert account.balance.allowance_used > 0
        counters = await stack.envoy_counters("cluster.quotagate_")
        for cluster in ("authz", "extproc", "ratelimit"):
            assert counters.get(f"cluster.quotagate_{cluster}.ssl.handshake", 0) >= 1, counters
            assert counters.get(f"cluster.quotagate_{cluster}.ssl.connection_error", 0) == 0, counters


async def charged(stack: Stack, user: str) -> admin_pb2.Account:
    deadline = time.monotonic() + 10
    while True:
        account = await stack.account(user)
        if account.balance.reserved == 0 and account.balance.allowance_used > 0:
            return account
        if time.monotonic() > deadline:
            raise AssertionError(f"not charged: {account.balance}")
        await asyncio.sleep(0.05)


# -- the deploy files -------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
ENVOY_TLS_FILE = REPO_ROOT / "envoy" / "envoy-decision-tls.yaml"
OVERRIDE_FILE = REPO_ROOT / "docker-compose.decision-tls.yml"


def test_the_shipped_envoy_tls_config_is_up_to_date_and_envoy_accepts_it(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ENVOY_TLS_FILE.read_text()
    command = re.match(r"# Generated by `python -m quotagate\.envoyconf (.*)`\.\n", text)
    assert command is not None
    assert envoyconf_main(shlex.split(command.group(1))) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(text)
    # Envoy opens the files it names: the same config with this test's certificates in their place.
    for name, source in (("ca.pem", "ca.pem"), ("envoy.pem", "client.pem"), ("envoy.key", "client.key")):
        (tmp_path / name).write_bytes(Path(pki.path(source)).read_bytes())
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace("/etc/envoy/tls/", f"{tmp_path}/"))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(local), "--disable-hot-restart", "-l", "warn"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_override_gives_envoy_and_quotagate_what_their_configs_name() -> None:
    services = yaml.safe_load(OVERRIDE_FILE.read_text())["services"]
    envoy_mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in services["envoy"]["volumes"])
    template = services["envoy"]["environment"]["QUOTAGATE_ENVOY_TEMPLATE"]
    assert (REPO_ROOT / envoy_mounts[template]).resolve() == ENVOY_TLS_FILE
    named = set(re.findall(r"filename: (/\S+)", ENVOY_TLS_FILE.read_text()))
    assert named == {"/etc/envoy/tls/ca.pem", "/etc/envoy/tls/envoy.pem", "/etc/envoy/tls/envoy.key"}
    assert envoy_mounts["/etc/envoy/tls"] == "./deploy/tls/envoy"
    (quotagate_mount,) = services["quotagate"]["volumes"]
    # Beside the config file (/etc/quotagate/quotagate.yaml) as deploy/tls/quotagate is beside deploy/quotagate.yaml.
    assert quotagate_mount == "./deploy/tls/quotagate:/etc/quotagate/tls/quotagate:ro"


def test_the_commented_decision_tls_of_the_deploy_config_loads_once_uncommented(tmp_path: Path, pki: Pki) -> None:
    lines = (REPO_ROOT / "deploy" / "quotagate.yaml").read_text().splitlines()
    start = lines.index("# decision:")
    block = [line.removeprefix("# ") for line in lines[start : start + 5]]
    assert block[1] == "  tls:"
    config = tmp_path / "quotagate.yaml"
    config.write_text("\n".join(lines[:start] + block + lines[start + 5 :]) + "\n")
    folder = tmp_path / "tls" / "quotagate"
    folder.mkdir(parents=True)
    for name, source in (("quotagate.pem", "server.pem"), ("quotagate.key", "server.key"), ("ca.pem", "ca.pem")):
        (folder / name).write_bytes(Path(pki.path(source)).read_bytes())
    tls = load_settings(config, {}).decision_tls
    assert tls == DecisionTls(folder / "quotagate.pem", folder / "quotagate.key", folder / "ca.pem")
    assert server_context(tls).verify_mode == ssl.CERT_REQUIRED
