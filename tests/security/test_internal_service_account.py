"""The reviewer's chain, on the platform as `corral dev` runs it: an admin of the organisation
holding Corral's internal service account (organizations/default) lists it, mints a key for
it, exchanges the key for a token with the ``service`` role and calls the runtime as Corral's
services. Each step is refused now: the account is hidden from them, no key is made, the
runtime refuses what the admin does hold, and taking over the superuser (who could mint the
key) is refused too. The platform's own services keep working with the operator's key."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import jwt
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import role_pb2, service_account_pb2, user_pb2
from corral.runtime.v1 import runtime_service_pb2 as rpb
from corral.runtime.v1 import runtime_service_pb2_grpc as rpb_grpc
from tests.security.conftest import PASSWORD, World, bearer

DEFAULT = "organizations/default"


def _roles(token: str) -> list[str]:
    roles: list[str] = jwt.decode(token, options={"verify_signature": False})["roles"]
    return roles


async def _default_admin(world: World) -> str:
    identity = world.platform.identity
    email = f"admin-{uuid.uuid4().hex[:8]}@default.test"
    await identity.CreateUser(
        ipb.CreateUserRequest(
            parent=DEFAULT,
            user=user_pb2.User(
                email=email,
                display_name="default admin",
                role=role_pb2.ROLE_ADMIN,
                password=PASSWORD,
            ),
        ),
        metadata=world.platform.auth,
    )
    login = await identity.Login(ipb.LoginRequest(email=email, password=PASSWORD))
    return str(login.token.access_token)


async def _outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """The call's status code and its ErrorInfo reason ("" if it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        status = rpc_status.from_call(exc)
        assert status is not None, "the error carries no google.rpc.Status"
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return exc.code(), info.reason
        raise AssertionError("no ErrorInfo detail") from exc
    return grpc.StatusCode.OK, ""


HIDDEN = (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


async def test_org_admin_cannot_become_corral_services(world: World) -> None:
    identity = world.platform.identity
    admin = bearer(await _default_admin(world))
    service_token = await world.service_token()
    internal = jwt.decode(service_token, options={"verify_signature": False})["sub"]
    assert internal.startswith(f"{DEFAULT}/serviceAccounts/")

    # 1. Listing the organisation's service accounts: the platform's own is not among them.
    listed = await identity.ListServiceAccounts(
        ipb.ListServiceAccountsRequest(parent=DEFAULT), metadata=admin
    )
    assert internal not in {a.name for a in listed.service_accounts}

    # 2. Minting a key for it (its name known some other way, e.g. an audit event): NOT_FOUND.
    mint = ipb.CreateApiKeyRequest(parent=internal, request_id=str(uuid.uuid4()))
    assert await _outcome(identity.CreateApiKey(mint, metadata=admin)) == HIDDEN
    # Nor renaming, demoting or deleting it (the DoS).
    rename = ipb.UpdateServiceAccountRequest(
        service_account=service_account_pb2.ServiceAccount(
            name=internal, display_name="gone", role=role_pb2.ROLE_VIEWER
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "role"]),
    )
    assert await _outcome(identity.UpdateServiceAccount(rename, metadata=admin)) == HIDDEN
    delete = ipb.DeleteServiceAccountRequest(name=internal)
    assert await _outcome(identity.DeleteServiceAccount(delete, metadata=admin)) == HIDDEN

    # 3. The superuser (who could mint it) is beyond the admin's reach: no password reset.
    superuser = jwt.decode(world.platform.token, options={"verify_signature": False})["sub"]
    reset = ipb.ChangeUserPasswordRequest(name=superuser, new_password="now it is mine, ok")
    assert await _outcome(identity.ChangeUserPassword(reset, metadata=admin)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "SUPERUSER_REQUIRED",
    )

    # 4. What the admin does hold carries no service role, and the runtime refuses it.
    assert "service" not in _roles(admin[0][1].removeprefix("Bearer "))
    runtime = rpb_grpc.RuntimeServiceStub(world.platform.channel("runtime"))
    status = rpb.GetRuntimeStatusRequest()
    refused, _ = await _outcome(runtime.GetRuntimeStatus(status, metadata=admin))
    assert refused == grpc.StatusCode.PERMISSION_DENIED

    # The platform's services still act as themselves with the operator's key, and turns run.
    fresh = await world.service_token()
    assert "service" in _roles(fresh)
    reply = await runtime.GetRuntimeStatus(status, metadata=bearer(fresh))
    assert reply.status.pool_size > 0
    kept = await identity.GetServiceAccount(
        ipb.GetServiceAccountRequest(name=internal), metadata=world.platform.auth
    )
    assert kept.service_account.display_name != "gone"
