"""Signing keys: publish before signing, keep retired keys until their tokens expire, and the
JWKS over gRPC and plain HTTP with public members only."""

from __future__ import annotations

import asyncio
import json

import grpc
import jwt
import sqlalchemy as sa

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import signing_key_pb2
from corral.libs import db
from corral.libs.auth import HttpJwksSource, TokenVerifier
from tests.identity.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    Identity,
    IdentityFactory,
    bearer,
    fails,
)


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], {k.lower(): v for k, v in headers.items()}, body


async def test_http_jwks_publishes_public_keys_only(make_identity: IdentityFactory) -> None:
    identity = await make_identity(jwks_cache_seconds=120)
    assert identity.app.jwks_http is not None
    port = identity.app.jwks_http.port
    status, headers, body = await _http(
        port, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "application/json"
    assert "max-age=120" in headers["cache-control"]
    document = json.loads(body)
    assert len(document["keys"]) == 2  # the active key and the pending one
    for key in document["keys"]:
        assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    grpc_keys = await identity.stub.GetJwks(pb.GetJwksRequest())
    assert sorted(k.kid for k in grpc_keys.keys) == sorted(k["kid"] for k in document["keys"])
    assert all(not k.n and not k.e for k in grpc_keys.keys)
    for path in (b"/", b"/.well-known/jwks.json.bak", b"/../etc/passwd"):
        status, _, _ = await _http(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 404 Not Found"
    status, _, _ = await _http(port, b"POST /.well-known/jwks.json HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 404 Not Found"

    # What other services and Envoy do: fetch over HTTP and verify an access token with it.
    token = (await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)).token.access_token
    verifier = TokenVerifier(
        HttpJwksSource(identity.jwks_url),
        issuer=identity.settings.jwt_issuer,
        audience=identity.settings.jwt_audience,
    )
    assert (await verifier.verify(token)).subject.startswith("organizations/default/users/")


async def test_rotation_publishes_first_and_retires_late(make_identity: IdentityFactory) -> None:
    identity = await make_identity(identity_key_retirement_seconds=30)
    root = await identity.root()
    before = (await identity.stub.GetJwks(pb.GetJwksRequest())).keys
    old_kid = jwt.get_unverified_header(root)["kid"]

    rotation = await identity.stub.RotateSigningKeys(
        pb.RotateSigningKeysRequest(), metadata=bearer(root)
    )
    # The key that now signs was already published before the rotation.
    assert rotation.active_key.name.removeprefix("signingKeys/") in {k.kid for k in before}
    assert rotation.previous_key.name == f"signingKeys/{old_kid}"
    assert rotation.previous_key.state == signing_key_pb2.SigningKey.STATE_RETIRED
    assert rotation.pending_key.state == signing_key_pb2.SigningKey.STATE_PENDING
    after = {k.kid for k in (await identity.stub.GetJwks(pb.GetJwksRequest())).keys}
    assert {old_kid, rotation.pending_key.name.removeprefix("signingKeys/")} <= after

    # A token signed before the rotation is still good; new tokens use the new key.
    await identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(root))
    fresh = await identity.root()
    assert jwt.get_unverified_header(fresh)["kid"] == rotation.active_key.name.split("/")[1]

    # After the retirement period the old key leaves the JWKS and its tokens are refused.
    identity.clock.advance(31)
    assert old_kid not in {k.kid for k in (await identity.stub.GetJwks(pb.GetJwksRequest())).keys}
    await fails(
        identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(root)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_KEY_UNKNOWN",
    )
    await identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(fresh))
    # The next rotation wipes the private half of every key that left the JWKS.
    await identity.stub.RotateSigningKeys(pb.RotateSigningKeysRequest(), metadata=bearer(fresh))
    assert await _stored_private_key(identity, old_kid) == b""


async def test_revoking_rotation_drops_the_old_key_at_once(make_identity: IdentityFactory) -> None:
    identity = await make_identity()
    root = await identity.root()
    old_kid = jwt.get_unverified_header(root)["kid"]
    rotation = await identity.stub.RotateSigningKeys(
        pb.RotateSigningKeysRequest(revoke_previous=True), metadata=bearer(root)
    )
    assert rotation.previous_key.state == signing_key_pb2.SigningKey.STATE_REVOKED
    assert old_kid not in {k.kid for k in (await identity.stub.GetJwks(pb.GetJwksRequest())).keys}
    listed = await identity.stub.ListSigningKeys(
        pb.ListSigningKeysRequest(filter="state = REVOKED"), metadata=bearer(await identity.root())
    )
    assert [k.name for k in listed.signing_keys] == [f"signingKeys/{old_kid}"]


async def _stored_private_key(identity: Identity, kid: str) -> bytes:
    settings = identity.settings
    engine = db.create_engine(
        settings.database_url_for("identity"), schema=settings.identity_database_schema
    )
    try:
        async with engine.connect() as connection:
            query = sa.text("SELECT private_key FROM signing_keys WHERE kid = :kid")
            return bytes((await connection.execute(query, {"kid": kid})).scalar_one())
    finally:
        await engine.dispose()


async def test_racing_rotations_leave_one_active_and_one_pending(
    make_identity: IdentityFactory,
) -> None:
    identity = await make_identity()
    root = await identity.root()
    results = await asyncio.gather(
        *(
            identity.stub.RotateSigningKeys(pb.RotateSigningKeysRequest(), metadata=bearer(root))
            for _ in range(4)
        ),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) < len(results)
    for failure in failures:
        assert isinstance(failure, grpc.aio.AioRpcError)
        assert failure.code() == grpc.StatusCode.ABORTED
    listed = await identity.stub.ListSigningKeys(pb.ListSigningKeysRequest(), metadata=bearer(root))
    states = [k.state for k in listed.signing_keys]
    assert states.count(signing_key_pb2.SigningKey.STATE_ACTIVE) == 1
    assert states.count(signing_key_pb2.SigningKey.STATE_PENDING) == 1
    assert states.count(signing_key_pb2.SigningKey.STATE_RETIRED) == len(results) - len(failures)
