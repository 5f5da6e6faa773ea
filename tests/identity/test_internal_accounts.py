"""Corral's internal service accounts (tokens with the ``service`` role) and superusers' user
accounts are beyond an organization admin's reach: the internal account is hidden from them
(NOT_FOUND on every RPC that names it or its keys, absent from the list), only superusers and
``corral admin`` manage it, and a superuser's account cannot be reset, changed, disabled or
signed out by an admin (which would hand over a superuser token, and with it the keys)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import role_pb2, service_account_pb2, user_pb2
from corral.services.identity import admin
from tests.identity.conftest import Identity, bearer, fails
from tests.identity.world import create_user

DEFAULT = "organizations/default"


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


@dataclass
class Scene:
    identity: Identity
    root: str  # the bootstrap superuser's token (in organizations/default)
    admin: str  # an admin of organizations/default, not a superuser
    internal: str  # the dev bootstrap's internal service account (Corral's services)
    service_key: str  # its API key, made by the bootstrap (the operator's)
    key_name: str  # that key's resource name

    async def exchange(self, key: str) -> str:
        reply = await self.identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=key))
        return reply.token.access_token


async def scene(identity: Identity) -> Scene:
    key = (identity.settings.data_dir / "service-api-key").read_text().strip()
    exchanged = await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=key))
    internal = exchanged.service_account
    assert "service" in claims(exchanged.token.access_token)["roles"]
    root = await identity.root()
    keys = await identity.stub.ListApiKeys(
        pb.ListApiKeysRequest(parent=internal), metadata=bearer(root)
    )
    admin_user = await create_user(identity, root, DEFAULT, role_pb2.ROLE_ADMIN, "admin")
    return Scene(
        identity,
        root,
        await identity.token(admin_user.email),
        internal,
        key,
        keys.api_keys[0].name,
    )


def _account(name: str, **fields: Any) -> service_account_pb2.ServiceAccount:
    return service_account_pb2.ServiceAccount(name=name, **fields)


def _calls(s: Scene) -> dict[str, Callable[[str], Awaitable[Any]]]:
    """Every RPC that names the internal account or its keys, as a caller would send it."""
    stub, name = s.identity.stub, s.internal
    return {
        "GetServiceAccount": lambda token: stub.GetServiceAccount(
            pb.GetServiceAccountRequest(name=name), metadata=bearer(token)
        ),
        "CreateApiKey": lambda token: stub.CreateApiKey(
            pb.CreateApiKeyRequest(parent=name, request_id=str(uuid.uuid4())),
            metadata=bearer(token),
        ),
        "ListApiKeys": lambda token: stub.ListApiKeys(
            pb.ListApiKeysRequest(parent=name), metadata=bearer(token)
        ),
        "GetApiKey": lambda token: stub.GetApiKey(
            pb.GetApiKeyRequest(name=s.key_name), metadata=bearer(token)
        ),
        "UpdateServiceAccount": lambda token: stub.UpdateServiceAccount(
            pb.UpdateServiceAccountRequest(
                service_account=_account(name, display_name="mine", role=role_pb2.ROLE_VIEWER),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "role"]),
            ),
            metadata=bearer(token),
        ),
        "RevokeApiKey": lambda token: stub.RevokeApiKey(
            pb.RevokeApiKeyRequest(name=s.key_name), metadata=bearer(token)
        ),
        "DeleteServiceAccount": lambda token: stub.DeleteServiceAccount(
            pb.DeleteServiceAccountRequest(name=name), metadata=bearer(token)
        ),
    }


async def _listed(s: Scene, token: str) -> set[str]:
    reply = await s.identity.stub.ListServiceAccounts(
        pb.ListServiceAccountsRequest(parent=DEFAULT), metadata=bearer(token)
    )
    return {a.name for a in reply.service_accounts}


async def test_org_admin_cannot_see_or_manage_the_internal_service_account(
    identity: Identity,
) -> None:
    s = await scene(identity)
    stub = identity.stub
    before = await stub.GetServiceAccount(
        pb.GetServiceAccountRequest(name=s.internal), metadata=bearer(s.root)
    )
    # The admin's own (plain) account is listed to them; the internal one is not.
    own = await stub.CreateServiceAccount(
        pb.CreateServiceAccountRequest(
            parent=DEFAULT,
            service_account=_account("", display_name="ci", role=role_pb2.ROLE_ADMIN),
        ),
        metadata=bearer(s.admin),
    )
    assert await _listed(s, s.admin) == {own.service_account.name}
    assert await _listed(s, s.root) == {own.service_account.name, s.internal}
    # Every RPC naming it answers as for an account that does not exist.
    missing = await fails(
        stub.GetServiceAccount(
            pb.GetServiceAccountRequest(name=f"{DEFAULT}/serviceAccounts/nope"),
            metadata=bearer(s.admin),
        ),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    for method, call in _calls(s).items():
        refused = await fails(call(s.admin), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        assert refused.details().startswith("organizations/default/"), method
        assert refused.details().endswith(" was not found"), method
    assert missing.details().endswith(" was not found")
    # Nothing changed: the account, its key and the services' token with the service role.
    after = await stub.GetServiceAccount(
        pb.GetServiceAccountRequest(name=s.internal), metadata=bearer(s.root)
    )
    assert after.service_account == before.service_account
    keys = await stub.ListApiKeys(pb.ListApiKeysRequest(parent=s.internal), metadata=bearer(s.root))
    assert [k.name for k in keys.api_keys] == [s.key_name]
    assert "service" in claims(await s.exchange(s.service_key))["roles"]


async def test_superuser_manages_the_internal_service_account(identity: Identity) -> None:
    s = await scene(identity)
    stub = identity.stub
    created = await stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=s.internal, request_id=str(uuid.uuid4())),
        metadata=bearer(s.root),
    )
    token = await s.exchange(created.plaintext_key)
    assert set(claims(token)["roles"]) == {"admin", "service"}
    got = await stub.GetApiKey(
        pb.GetApiKeyRequest(name=created.api_key.name), metadata=bearer(s.root)
    )
    assert got.api_key.name == created.api_key.name
    updated = await stub.UpdateServiceAccount(
        pb.UpdateServiceAccountRequest(
            service_account=_account(s.internal, display_name="Corral services (renamed)"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(s.root),
    )
    assert updated.service_account.display_name == "Corral services (renamed)"
    await stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(name=created.api_key.name), metadata=bearer(s.root)
    )
    await fails(
        stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.plaintext_key)),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_REVOKED",
    )
    await stub.DeleteServiceAccount(
        pb.DeleteServiceAccountRequest(name=s.internal), metadata=bearer(s.root)
    )
    await fails(
        stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=s.service_key)),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_REVOKED",
    )


async def test_the_internal_account_sees_itself_but_cannot_manage_itself(
    identity: Identity,
) -> None:
    """It holds the admin role in its organization, yet minting its own keys (or renaming or
    deleting itself) stays a superuser's."""
    s = await scene(identity)
    own = await s.exchange(s.service_key)
    reply = await identity.stub.GetServiceAccount(
        pb.GetServiceAccountRequest(name=s.internal), metadata=bearer(own)
    )
    assert reply.service_account.name == s.internal
    for method, call in _calls(s).items():
        if method == "GetServiceAccount":
            continue
        await fails(call(own), grpc.StatusCode.PERMISSION_DENIED, "SUPERUSER_REQUIRED")
    assert "service" in claims(await s.exchange(s.service_key))["roles"]


async def test_corral_admin_still_manages_internal_accounts(
    identity: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    s = await scene(identity)
    settings = identity.settings
    assert await admin.run(["create-api-key", s.internal], settings, json_output=True) == 0
    made = json.loads(capsys.readouterr().out)
    assert "service" in claims(await s.exchange(made["api_key"]))["roles"]
    args = ["create-service-account", "--org", "default", "--display-name", "ops", "--internal"]
    assert await admin.run(args, settings, json_output=True) == 0
    account = json.loads(capsys.readouterr().out)["name"]
    assert account not in await _listed(s, s.admin)
    assert account in await _listed(s, s.root)


async def test_nothing_an_org_admin_does_yields_the_service_role(identity: Identity) -> None:
    s = await scene(identity)
    stub = identity.stub
    # Their own service account, even with the admin role, exchanges for no service role.
    account = await stub.CreateServiceAccount(
        pb.CreateServiceAccountRequest(
            parent=DEFAULT,
            service_account=_account("", display_name="ci", role=role_pb2.ROLE_ADMIN),
        ),
        metadata=bearer(s.admin),
    )
    name = account.service_account.name
    key = await stub.CreateApiKey(pb.CreateApiKeyRequest(parent=name), metadata=bearer(s.admin))
    assert claims(await s.exchange(key.plaintext_key))["roles"] == ["admin"]
    # "internal" is no field an update may name.
    await fails(
        stub.UpdateServiceAccount(
            pb.UpdateServiceAccountRequest(
                service_account=_account(name),
                update_mask=field_mask_pb2.FieldMask(paths=["internal"]),
            ),
            metadata=bearer(s.admin),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # A user made admin by an admin signs in with the admin role, nothing more.
    user = await create_user(identity, s.admin, DEFAULT, role_pb2.ROLE_USER, "promoted")
    await stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(name=user.name, role=role_pb2.ROLE_ADMIN),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=bearer(s.admin),
    )
    assert claims(await identity.token(user.email))["roles"] == ["admin"]


async def test_org_admin_cannot_take_over_a_superuser_account(identity: Identity) -> None:
    """Resetting the bootstrap superuser's password would make the admin a superuser (who may
    mint the internal account's keys): every change to that account is refused."""
    s = await scene(identity)
    stub = identity.stub
    superuser = claims(s.root)["sub"]
    attempts: dict[str, Callable[[], Awaitable[Any]]] = {
        "ChangeUserPassword": lambda: stub.ChangeUserPassword(
            pb.ChangeUserPasswordRequest(name=superuser, new_password="the admin's now, thanks"),
            metadata=bearer(s.admin),
        ),
        "UpdateUser email": lambda: stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(name=superuser, email="mine@default.test"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
            metadata=bearer(s.admin),
        ),
        "UpdateUser role": lambda: stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(name=superuser, role=role_pb2.ROLE_VIEWER),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=bearer(s.admin),
        ),
        "DisableUser": lambda: stub.DisableUser(
            pb.DisableUserRequest(name=superuser), metadata=bearer(s.admin)
        ),
        "EnableUser": lambda: stub.EnableUser(
            pb.EnableUserRequest(name=superuser), metadata=bearer(s.admin)
        ),
        "LogoutEverywhere": lambda: stub.LogoutEverywhere(
            pb.LogoutEverywhereRequest(user=superuser), metadata=bearer(s.admin)
        ),
    }
    for attempt in attempts.values():
        await fails(attempt(), grpc.StatusCode.PERMISSION_DENIED, "SUPERUSER_REQUIRED")
    # The superuser is untouched: their token works and their password still signs in.
    await stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(s.root))
    again = await identity.root()
    assert "superuser" in claims(again)["roles"]
    # An admin still resets an ordinary member's password, and the superuser their own.
    member = await create_user(identity, s.admin, DEFAULT, role_pb2.ROLE_USER, "member")
    await stub.ChangeUserPassword(
        pb.ChangeUserPasswordRequest(name=member.name, new_password="a brand new password"),
        metadata=bearer(s.admin),
    )
    await identity.token(member.email, "a brand new password")
    await stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(name=superuser, display_name="Root"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(again),
    )
