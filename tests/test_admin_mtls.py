"""The Admin API on a port of its own with mutual TLS: certificates made here (a CA, the server's, a client's, and
a client's from another CA), a real server with real PostgreSQL and Redis, and `quotagate admin` over TLS."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import ADMIN_TOKEN, make_settings
from test_service_ports import grpcurl

from quotagate.config import ConfigError, load_settings, parse_settings
from quotagate.procs import free_port
from quotagate.server import Running, start
from quotagate.service import UsageReport
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc

TOKEN = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: Issued | None, *, ca: bool = False, server: bool = False) -> Issued:
    """A certificate for `subject`, signed by `issuer` (self-signed when None), with its private key as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    issuer_key = key
    issuer_name = _name(subject)
    if issuer is not None:
        loaded = serialization.load_pem_private_key(issuer.key, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        issuer_key = loaded
        issuer_name = x509.load_pem_x509_certificate(issuer.cert).subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    return Issued(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass
class Pki:
    folder: Path
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA

    def path(self, name: str) -> str:
        return str(self.folder / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue("quotagate test CA", None, ca=True)
    other_ca = _issue("some other CA", None, ca=True)
    made = Pki(
        folder,
        ca,
        _issue("localhost", ca, server=True),
        _issue("ops-laptop", ca),
        _issue("ops-laptop", other_ca),
    )
    for name, issued in (("ca", ca), ("server", made.server), ("client", made.client), ("stranger", made.stranger)):
        (folder / f"{name}.pem").write_bytes(issued.cert)
        (folder / f"{name}.key").write_bytes(issued.key)
    return made


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str, pki: Pki) -> AsyncIterator[Running]:
    admin = {
        "listen": f"127.0.0.1:{free_port()}",
        "tls": {"cert": pki.path("server.pem"), "key": pki.path("server.key"), "client_ca": pki.path("ca.pem")},
    }
    running = await start(make_settings(database_url, redis_url, redis_prefix, admin=admin))
    yield running
    await running.stop()


def _tls(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=client.key, certificate_chain=client.cert
    )


async def test_admin_port_requires_a_client_certificate_from_the_ca_and_the_token(
    server: Running, pki: Pki, uid: str
) -> None:
    assert server.admin_port != server.grpc_port
    await server.service.report_usage(UsageReport(f"{uid}-1", uid, "demo-small", 120, 0))
    address = f"127.0.0.1:{server.admin_port}"
    async with grpc.aio.secure_channel(address, _tls(pki, pki.client)) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        account = await admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=TOKEN, timeout=10)
        assert account.balance.allowance_used == 120
        # The certificate admits the connection; each call still needs an admin token.
        for metadata in ([], [("authorization", "Bearer wrong-token")]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Only the Admin service (with health and reflection) is served there.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await usage_pb2_grpc.UsageStub(channel).ReportUsage(usage_pb2.ReportUsageRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "quotagate.v1.Admin" in await _reflected_services(channel)

    for credentials in (_tls(pki, None), _tls(pki, pki.stranger)):
        async with grpc.aio.secure_channel(address, credentials) as refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin_pb2_grpc.AdminStub(refused).GetAccount(
                    admin_pb2.GetAccountRequest(user_id=uid), metadata=TOKEN, timeout=5
                )
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    async with grpc.aio.insecure_channel(address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_pb2_grpc.AdminStub(plaintext).GetAccount(
                admin_pb2.GetAccountRequest(user_id=uid), metadata=TOKEN, timeout=5
            )
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    # The main plaintext port serves Envoy's services and Usage, but not Admin any more.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as main:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_pb2_grpc.AdminStub(main).GetAccount(
                admin_pb2.GetAccountRequest(user_id=uid), metadata=TOKEN, timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        services = await _reflected_services(main)
        assert "quotagate.v1.Usage" in services and "quotagate.v1.Admin" not in services


async def _reflected_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=10):
        return {s.name for s in reply.list_services_response.service}
    return set()


async def cli(server: Running, *args: str, env_extra: dict[str, str] | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_ADMIN_")}
    env.update({"QUOTAGATE_ADMIN_TOKEN": ADMIN_TOKEN, **(env_extra or {})})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "admin", "--server", f"127.0.0.1:{server.admin_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_over_mutual_tls(server: Running, pki: Pki, uid: str) -> None:
    await server.service.report_usage(UsageReport(f"{uid}-1", uid, "demo-small", 250, 0))
    options = ["--cacert", pki.path("ca.pem"), "--cert", pki.path("client.pem"), "--key", pki.path("client.key")]
    code, out, err = await cli(server, *options, "account", "show", uid)
    assert code == 0, err
    assert "250 of 1,000 used" in out

    # The same from the environment.
    variables = {
        "QUOTAGATE_ADMIN_CACERT": pki.path("ca.pem"),
        "QUOTAGATE_ADMIN_CERT": pki.path("client.pem"),
        "QUOTAGATE_ADMIN_KEY": pki.path("client.key"),
    }
    code, out, err = await cli(server, "--json", "account", "show", uid, env_extra=variables)
    assert code == 0 and json.loads(out)["user_id"] == uid, err

    # A certificate from another CA is refused: the server is unreachable for this client (exit 6).
    stranger = ["--cacert", pki.path("ca.pem"), "--cert", pki.path("stranger.pem"), "--key", pki.path("stranger.key")]
    code, out, err = await cli(server, *stranger, "account", "show", uid)
    assert (code, out) == (6, "") and err.startswith("quotagate admin: unavailable:")

    code, _, err = await cli(server, "--cacert", pki.path("ca.pem"), "--cert", pki.path("client.pem"), "account",
                             "show", uid)  # fmt: skip
    assert code == 2 and "--cert and --key together" in err
    code, _, err = await cli(server, "--cacert", pki.path("missing.pem"), "account", "show", uid)
    assert code == 2 and "missing.pem" in err


async def test_grpcurl_over_mutual_tls(server: Running, pki: Pki, uid: str) -> None:
    await server.service.report_usage(UsageReport(f"{uid}-1", uid, "demo-small", 40, 0))
    address, auth = f"127.0.0.1:{server.admin_port}", f"authorization: Bearer {ADMIN_TOKEN}"
    tls = ["-cacert", pki.path("ca.pem"), "-cert", pki.path("client.pem"), "-key", pki.path("client.key")]
    code, out, err = await grpcurl(*tls, address, "list")
    assert code == 0, err
    assert "quotagate.v1.Admin" in out.split() and "quotagate.v1.Usage" not in out.split()
    request = json.dumps({"user_id": uid})
    code, out, err = await grpcurl(*tls, "-H", auth, "-d", request, address, "quotagate.v1.Admin/GetAccount")
    assert code == 0, err
    assert json.loads(out)["balance"]["allowance_used"] == "40"
    code, _, err = await grpcurl("-cacert", pki.path("ca.pem"), "-H", auth, "-d", request, address,
                                 "quotagate.v1.Admin/GetAccount")  # fmt: skip
    assert code != 0 and "Failed to dial" in err


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("admin_tls_without_listen.yaml", "admin.listen: required with admin.tls"),
        ("admin_tls_missing_file.yaml", "admin.tls.cert: no such file"),
        ("admin_tls_without_client_ca.yaml", "admin.tls.client_ca: required: mutual TLS needs cert, key and client_ca"),
        ("unknown_admin_key.yaml", "admin.port: unknown key"),
    ],
)
def test_bad_admin_config_names_file_and_key(name: str, error: str) -> None:
    path = Path(__file__).parent / "configs" / name
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value).startswith(f"{path}: {error}"), str(caught.value)


def test_admin_tls_paths_are_taken_from_the_config_folder(pki: Pki) -> None:
    config = pki.folder / "quotagate.yaml"
    config.write_text(
        "admin:\n  listen: 127.0.0.1:50052\n  tls: {cert: server.pem, key: server.key, client_ca: ca.pem}\n",
        encoding="utf-8",
    )
    settings = load_settings(config, {})
    assert settings.admin.tls and settings.admin.tls_client_ca == Path(pki.path("ca.pem"))
    listen = parse_settings({}, "<test>", {"QUOTAGATE_ADMIN_LISTEN": "127.0.0.1:50099"}).admin.listen
    assert listen == "127.0.0.1:50099"
