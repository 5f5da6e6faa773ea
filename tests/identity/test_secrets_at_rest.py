"""Identity's secrets at rest: private signing keys sealed under the deployment's key ring
(CORRAL_ENCRYPTION_KEYS), rotation of the ring without downtime, values sealed before the ring
re-sealed at start, and production refusing to start without a key."""

from __future__ import annotations

import base64
import json
import os

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.identity.v1 import identity_service_pb2 as pb
from corral.libs import db
from corral.libs.crypto import KeyRing, KeyRingError
from tests.identity.conftest import Identity, IdentityFactory, bearer


async def _stored(identity: Identity) -> dict[str, bytes]:
    """kid -> the private_key column, as the database holds it."""
    settings = identity.settings
    engine = db.create_engine(
        settings.database_url_for("identity"), schema=settings.identity_database_schema
    )
    try:
        async with engine.connect() as connection:
            found = await connection.execute(sa.text("SELECT kid, private_key FROM signing_keys"))
            return {kid: bytes(value) for kid, value in found}
    finally:
        await engine.dispose()


async def _store(identity: Identity, kid: str, value: bytes) -> None:
    settings = identity.settings
    engine = db.create_engine(
        settings.database_url_for("identity"), schema=settings.identity_database_schema
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("UPDATE signing_keys SET private_key = :value WHERE kid = :kid"),
                {"value": value, "kid": kid},
            )
    finally:
        await engine.dispose()


def _published_public_key(jwks: pb.GetJwksResponse, kid: str) -> ec.EllipticCurvePublicKey:
    entry = next(k for k in jwks.keys if k.kid == kid)
    jwk = {"kty": entry.kty, "crv": entry.crv, "x": entry.x, "y": entry.y}
    key = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(jwk))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


async def test_private_keys_are_sealed_under_the_key_ring(make_identity: IdentityFactory) -> None:
    keys = f"ops1:{KeyRing.generate_key()}"
    identity = await make_identity(encryption_keys=keys)
    token = await identity.root()  # signing works with the sealed key
    jwks = await identity.stub.GetJwks(pb.GetJwksRequest())
    stored = await _stored(identity)
    ring = KeyRing.parse(keys)
    assert jwt.get_unverified_header(token)["kid"] in stored
    for kid in (k.kid for k in jwks.keys):
        value = stored[kid]
        assert b"PRIVATE" not in value and b"plain:" not in value  # not in the clear
        assert ring.key_id_of(value) == "ops1"
        pem = ring.open(value, f"signingKeys/{kid}:private_key")
        private = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        # ... and it is the private half of the key the JWKS publishes under that kid.
        assert private.public_key().public_numbers() == (
            _published_public_key(jwks, kid).public_numbers()
        )


async def test_rotating_the_key_ring_keeps_identity_running(
    make_identity: IdentityFactory,
) -> None:
    """Add a new primary key (the old one kept for reading), restart: tokens still sign and
    verify, the keys are re-sealed with the new key; then the old key can go."""
    old, new = f"old:{KeyRing.generate_key()}", f"new:{KeyRing.generate_key()}"
    first = await make_identity(encryption_keys=old)
    before = await first.root()
    second = await make_identity(encryption_keys=f"{new},{old}")  # a replica with the new ring
    ring = KeyRing.parse(new)
    assert {ring.key_id_of(v) for v in (await _stored(second)).values() if v} == {"new"}
    # Tokens signed before the rotation still work, and new ones are signed.
    await second.stub.GetUser(pb.GetUserRequest(name=_subject(before)), metadata=bearer(before))
    after = await second.root()
    third = await make_identity(encryption_keys=new)  # the old key dropped
    await third.stub.GetUser(pb.GetUserRequest(name=_subject(after)), metadata=bearer(after))
    assert await third.root()


def _subject(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


async def test_keys_sealed_before_the_key_ring_are_resealed_at_start(
    make_identity: IdentityFactory,
) -> None:
    """A database from before the ring: its keys sealed with CORRAL_IDENTITY_KEY_ENCRYPTION_KEY
    (``aesgcm:``) or, in development, stored ``plain:``. Identity opens them once and re-seals
    them under the ring; afterwards the legacy key is not needed."""
    ring_keys = f"ring1:{KeyRing.generate_key()}"
    identity = await make_identity(encryption_keys=ring_keys)
    ring = KeyRing.parse(ring_keys)
    legacy = base64.urlsafe_b64encode(os.urandom(32)).decode()
    stored = await _stored(identity)
    kids = sorted(stored)
    for kid in kids:
        pem = ring.open(stored[kid], f"signingKeys/{kid}:private_key")
        nonce = os.urandom(12)
        sealed = AESGCM(base64.urlsafe_b64decode(legacy)).encrypt(nonce, pem, kid.encode())
        old_way = b"aesgcm:" + base64.b64encode(nonce + sealed)
        await _store(identity, kid, old_way if kid == kids[0] else b"plain:" + pem)
    restarted = await make_identity(encryption_keys=ring_keys, identity_key_encryption_key=legacy)
    assert {ring.key_id_of(v) for v in (await _stored(restarted)).values()} == {"ring1"}
    assert await (await make_identity(encryption_keys=ring_keys)).root()  # legacy key not needed


async def test_production_refuses_to_start_without_an_encryption_key(
    make_identity: IdentityFactory,
) -> None:
    with pytest.raises(KeyRingError, match="CORRAL_ENCRYPTION_KEYS"):
        await make_identity(env="production", encryption_keys="")
    assert await (await make_identity(encryption_keys=f"p1:{KeyRing.generate_key()}")).root()
