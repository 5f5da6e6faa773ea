"""TLS: between the services (``CORRAL_TLS_*``) and at the edge (``CORRAL_EDGE_TLS_*``).

- A service with ``tls_cert_file`` and ``tls_key_file`` serves TLS only (no plaintext port).
- A service with ``tls_ca_file`` calls the others over TLS, trusting that CA bundle, and so
  does the edge towards its upstreams. Set all three on every service to require TLS inside the
  deployment (certificates for each service's DNS name: ``identity``, ``session``, ...).
- The edge with ``edge_tls_cert_file`` and ``edge_tls_key_file`` terminates TLS for clients,
  HTTP/2 and HTTP/1.1 by ALPN (gRPC, grpc-web and REST alike).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from corral.libs.config import Settings
from corral.libs.metrics import meter

# Certificates this process serves with, for corral_tls_certificate_expiry_seconds (seconds
# since the epoch when each stops being valid; alerts fire ahead of it).
_served: dict[Path, str] = {}


def _observe_expiry(_: Any) -> Iterable[Any]:
    from cryptography import x509
    from opentelemetry.metrics import Observation

    for path, use in list(_served.items()):
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        expiry = certificate.not_valid_after_utc.timestamp()
        yield Observation(expiry, {"use": use, "file": path.name})


meter("corral.tls").create_observable_gauge(
    "corral.tls.certificate.expiry",
    [_observe_expiry],
    unit="s",
    description="when a served certificate expires (seconds since the epoch)",
)


class TlsError(Exception):
    """The TLS settings are incomplete or name files that cannot be read."""


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"CORRAL_{setting.upper()}={path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The service's TLS credentials, or None to serve plaintext."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TlsError("set both CORRAL_TLS_CERT_FILE and CORRAL_TLS_KEY_FILE, or neither")
    credentials = grpc.ssl_server_credentials(
        [(_read(key, "tls_key_file"), _read(cert, "tls_cert_file"))]
    )
    _served[cert] = "service"
    return credentials


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """Credentials for calling other services, or None to call them in plaintext."""
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file, "tls_ca_file")
    )
