"""`corral admin ...` on the identity database, then the results used through the server."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import usage_pb2
from corral.libs.config import Settings
from corral.libs.crypto import KeyRing
from corral.services.identity import admin
from tests.identity.conftest import IdentityFactory, bearer


def _last_value(output: str, label: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(label)).split()[
        len(label.split())
    ]


async def test_admin_commands(
    make_identity: IdentityFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = await make_identity()  # the server and the commands share one database
    settings = identity.settings
    assert await admin.run(["create-org", "acme", "--display-name", "Acme"], settings) == 0
    assert (
        await admin.run(
            [
                "create-user",
                "--org",
                "acme",
                "--email",
                "ops@acme.test",
                "--role",
                "admin",
                "--superuser",
            ],
            settings,
        )
        == 0
    )
    out = capsys.readouterr().out
    password = _last_value(out, "password:")
    assert (
        await admin.run(
            ["create-service-account", "--org", "acme", "--display-name", "ci"], settings
        )
        == 0
    )
    account = capsys.readouterr().out.strip()
    assert account.startswith("organizations/acme/serviceAccounts/")
    assert await admin.run(["create-api-key", account, "--expires-in-days", "1"], settings) == 0
    key = _last_value(capsys.readouterr().out, "api key:")
    assert await admin.run(["rotate-keys"], settings) == 0
    assert "previous: signingKeys/" in capsys.readouterr().out
    assert await admin.run(["create-org", "acme"], settings) == 1
    assert "ORGANIZATION_ID_TAKEN" in capsys.readouterr().err

    reply = await identity.login("ops@acme.test", password)
    assert reply.user.superuser
    listed = await identity.stub.ListOrganizations(
        pb.ListOrganizationsRequest(), metadata=bearer(reply.token.access_token)
    )
    assert {o.name for o in listed.organizations} == {"organizations/default", "organizations/acme"}
    exchanged = await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=key))
    assert exchanged.service_account == account


async def test_bootstrap_prints_a_generated_password_once(
    make_identity: IdentityFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = await make_identity(
        bootstrap_admin_email="first@corral.test", bootstrap_admin_password=""
    )
    err = capsys.readouterr().err
    password = _last_value(err, "  password:")
    reply = await identity.login("first@corral.test", password)
    assert reply.user.superuser
    assert reply.user.name.startswith("organizations/default/users/")
    await make_identity(bootstrap_admin_email="first@corral.test", bootstrap_admin_password="")
    assert "password" not in capsys.readouterr().err  # the second start creates nothing


async def test_internal_service_accounts_may_use_the_ledger(
    make_identity: IdentityFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """How other Corral services authenticate to identity: an internal account's API key."""
    identity = await make_identity()
    settings = identity.settings
    keys = {}
    for label, extra in (("internal", ["--internal"]), ("plain", [])):
        args = ["create-service-account", "--org", "default", "--display-name", label, *extra]
        assert await admin.run(args, settings) == 0
        account = capsys.readouterr().out.strip()
        assert await admin.run(["create-api-key", account], settings) == 0
        keys[label] = _last_value(capsys.readouterr().out, "api key:")
    request = pb.ReserveUsageRequest(
        parent="organizations/default",
        subject="organizations/default",
        amounts=[usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_RUNS, amount=1)],
        ttl=duration_pb2.Duration(seconds=30),
        request_id=str(uuid.uuid4()),
    )

    async def code_of(call: Any, message: Any, label: str) -> grpc.StatusCode:
        token = await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=keys[label]))
        try:
            await call(message, metadata=bearer(token.token.access_token))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert await code_of(identity.stub.ReserveUsage, request, "internal") == grpc.StatusCode.OK
    assert await code_of(identity.stub.ReserveUsage, request, "plain") == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # The runtime's budget hold reads what remains of any organisation's budget: only the
    # internal account may read another organisation's quota.
    assert await admin.run(["create-org", "acme", "--display-name", "Acme"], settings) == 0
    capsys.readouterr()
    quota = pb.GetQuotaRequest(name="organizations/acme/quota")
    assert await code_of(identity.stub.GetQuota, quota, "internal") == grpc.StatusCode.OK
    assert await code_of(identity.stub.GetQuota, quota, "plain") == grpc.StatusCode.NOT_FOUND


async def test_new_encryption_key_prints_a_key_ring_entry(
    make_identity: IdentityFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its output goes straight into CORRAL_ENCRYPTION_KEYS, and a server starts with it (no
    database or key ring needed to make one: production refuses to start without it)."""
    settings = Settings(env="production", encryption_keys="")
    assert await admin.run(["new-encryption-key"], settings) == 0
    first = capsys.readouterr().out.strip()
    assert await admin.run(["new-encryption-key"], settings) == 0
    second = capsys.readouterr().out.strip()
    assert first != second and first.split(":")[0] != second.split(":")[0]
    ring = KeyRing.parse(f"{second},{first}")
    assert ring.primary == second.split(":")[0]
    assert len(base64.b64decode(first.split(":", 1)[1])) == 32
    identity = await make_identity(
        env="production", auto_migrate=True, encryption_keys=f"{second},{first}"
    )
    assert len((await identity.stub.GetJwks(pb.GetJwksRequest())).keys) == 2  # keys were made
