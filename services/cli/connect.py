"""Where the CLI's API commands connect and who they sign in as.

Address: ``--target HOST:PORT`` or ``CORRAL_TARGET`` (one address for everything, such as the
edge, ``127.0.0.1:8080``), else each service at its own ``CORRAL_<SERVICE>_TARGET`` (the
development ports). TLS when ``CORRAL_TLS_CA_FILE`` names the CA to trust.

Identity, first found: ``CORRAL_TOKEN`` (an access token), ``CORRAL_API_KEY`` (a service
account's key), ``CORRAL_EMAIL`` + ``CORRAL_PASSWORD``, the bootstrap admin that ``corral dev``
saved in ``<data dir>/admin-credentials``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from corral.client import Client
from corral.libs.config import Settings


class SignInError(Exception):
    """No way to sign in was configured."""


def saved_credentials(settings: Settings) -> tuple[str, str]:
    """The bootstrap admin's sign-in: from the environment, else what `corral dev` saved."""
    email = os.environ.get("CORRAL_EMAIL") or os.environ.get("CORRAL_BOOTSTRAP_ADMIN_EMAIL", "")
    password = os.environ.get("CORRAL_PASSWORD") or os.environ.get(
        "CORRAL_BOOTSTRAP_ADMIN_PASSWORD", ""
    )
    saved = settings.data_dir / "admin-credentials"
    if (not email or not password) and saved.exists():
        email, password = saved.read_text().split("\n")[:2]
    return email, password


def targets(settings: Settings, target: str | None) -> str | dict[str, str]:
    chosen = target or os.environ.get("CORRAL_TARGET", "")
    if chosen:
        return chosen
    return {name: settings.target_for(name) for name in ("identity", "session", "task", "storage")}


def credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(settings.tls_ca_file.read_bytes())


@asynccontextmanager
async def signed_in(settings: Settings, target: str | None = None) -> AsyncIterator[Client]:
    """A client signed in as the configured identity (see the module's docstring)."""
    token = os.environ.get("CORRAL_TOKEN", "")
    async with Client(
        targets(settings, target), token=token or None, credentials=credentials(settings)
    ) as client:
        if not token:
            api_key = os.environ.get("CORRAL_API_KEY", "")
            if api_key:
                await client.exchange_api_key(api_key)
            else:
                email, password = saved_credentials(settings)
                if not email or not password:
                    raise SignInError(
                        "set CORRAL_TOKEN, CORRAL_API_KEY, or CORRAL_EMAIL and CORRAL_PASSWORD"
                    )
                await client.login(email, password)
        yield client
