"""TLS at the edge and between the services: a real Envoy terminating TLS for clients (HTTP/2
for gRPC, HTTP/1.1 for REST, by ALPN) and calling TLS-only services that trust one CA."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.libs.config import Settings
from corral.libs.envoy import Envoy, write_config
from corral.libs.grpc.client import create_channel
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.libs.tls import TlsError, channel_credentials, server_credentials
from tests.edge.conftest import _answering

IDENTITY = "corral.identity.v1.IdentityService"


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _make_pki(directory: Path) -> Pki:
    """A CA, and a certificate it signed for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("corral test CA"))
        .issuer_name(_name("corral test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


@dataclass
class TlsEdge:
    settings: Settings
    pki: Pki
    envoy: Envoy
    identity: CorralServer


@pytest.fixture(scope="module")
async def tls_edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsEdge]:
    directory = tmp_path_factory.mktemp("tls")
    pki = _make_pki(directory)
    settings = Settings(
        data_dir=directory,
        edge_port=0,
        tls_cert_file=pki.cert,
        tls_key_file=pki.key,
        tls_ca_file=pki.ca,
        edge_tls_cert_file=pki.cert,
        edge_tls_key_file=pki.key,
        jwks_url="http://127.0.0.1:9/.well-known/jwks.json",
    )
    servers = {
        name: CorralServer(
            ServerConfig(name=name, tracing=False, credentials=server_credentials(settings)),
            [_answering(f"corral.{name}.v1.{name.title()}Service", name)],
        )
        for name in ("identity", "session", "task", "storage")
    }
    for server in servers.values():
        await server.start()
    config = write_config(
        settings,
        directory,
        upstreams={name: [server.address] for name, server in servers.items()},
        health_interval=0.2,
    )
    envoy = Envoy(config, log_file=directory / "envoy.log")
    await envoy.start()
    try:
        yield TlsEdge(settings, pki, envoy, servers["identity"])
    finally:
        await envoy.stop()
        await asyncio.gather(*(server.stop(0) for server in servers.values()))


def _call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
    return channel.unary_unary(f"/{IDENTITY}/Login")  # public at the edge


async def _until_answered(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    """Envoy health-checks its upstreams over TLS before it routes to them."""
    async with asyncio.timeout(20):
        while True:
            try:
                await _call(channel)(b"", timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return error
            await asyncio.sleep(0.1)


async def test_grpc_through_a_tls_edge_to_tls_services(tls_edge: TlsEdge) -> None:
    port = tls_edge.envoy.url.rsplit(":", 1)[1]
    async with create_channel(
        f"localhost:{port}", credentials=channel_credentials(tls_edge.settings), tracing=False
    ) as channel:
        answered = await _until_answered(channel)
    assert answered.code() == grpc.StatusCode.NOT_FOUND
    assert "identity answered" in (answered.details() or "")


async def test_rest_over_tls_with_http_1_1(tls_edge: TlsEdge) -> None:
    port = int(tls_edge.envoy.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(tls_edge.pki.ca))
    context.set_alpn_protocols(["http/1.1"])

    def get() -> tuple[int, str | None]:
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        try:
            connection.request("GET", "/v1/organizations/acme")
            response = connection.getresponse()
            response.read()
            assert connection.sock is not None
            return response.status, connection.sock.selected_alpn_protocol()
        finally:
            connection.close()

    status, protocol = await asyncio.to_thread(get)
    assert protocol == "http/1.1"
    assert status in (401, 404)  # an answer from behind the edge, not a TLS failure


async def test_plaintext_is_refused_at_the_edge_and_at_the_services(tls_edge: TlsEdge) -> None:
    port = tls_edge.envoy.url.rsplit(":", 1)[1]
    for target in (f"127.0.0.1:{port}", tls_edge.identity.address):
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _call(channel)(b"", timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="both"):
        server_credentials(Settings(tls_cert_file=tmp_path / "cert.pem"))
    with pytest.raises(TlsError, match="CORRAL_TLS_CA_FILE"):
        channel_credentials(Settings(tls_ca_file=tmp_path / "missing.pem"))
