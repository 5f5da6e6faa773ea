"""Secrets and tokens: signing keys (ES256, sealed at rest), access JWTs, passwords, opaque tokens.

Private signing keys are stored PEM-encoded and sealed with AES-256-GCM when a key-encryption
key is configured (``CORRAL_IDENTITY_KEY_ENCRYPTION_KEY``); without one (development) they are
stored in the clear and a warning is logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import string
from dataclasses import dataclass
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.libs.auth.jwt import ACCESS_TOKEN_TYPE
from corral.libs.names import new_id

log = logging.getLogger("corral.identity.tokens")

ALGORITHM = "ES256"
PUBLIC_JWK_FIELDS = ("kty", "crv", "x", "y", "kid", "alg", "use")
_SEALED = b"aesgcm:"
_PLAIN = b"plain:"
BASE62 = string.ascii_letters + string.digits
API_KEY_PREFIX = "crl_"
API_KEY_LOOKUP_CHARS = 8
API_KEY_CHARS = 43


class KeyCipher:
    """Seals private keys at rest with AES-256-GCM (the kid is the associated data)."""

    def __init__(self, key_b64: str) -> None:
        self._aead: AESGCM | None = None
        if key_b64:
            raw = base64.urlsafe_b64decode(key_b64 + "=" * (-len(key_b64) % 4))
            if len(raw) != 32:
                raise ValueError("the key-encryption key must be 32 bytes, base64-encoded")
            self._aead = AESGCM(raw)
        else:
            log.warning(
                "signing keys are stored unencrypted: set CORRAL_IDENTITY_KEY_ENCRYPTION_KEY"
            )

    def seal(self, kid: str, plaintext: bytes) -> bytes:
        if self._aead is None:
            return _PLAIN + plaintext
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, kid.encode())
        return _SEALED + base64.b64encode(nonce + sealed)

    def open(self, kid: str, stored: bytes) -> bytes:
        if stored.startswith(_PLAIN):
            return stored[len(_PLAIN) :]
        if self._aead is None:
            raise RuntimeError("signing keys are sealed but no key-encryption key is configured")
        raw = base64.b64decode(stored[len(_SEALED) :])
        return self._aead.decrypt(raw[:12], raw[12:], kid.encode())


@dataclass(frozen=True)
class GeneratedKey:
    kid: str
    private_pem: bytes
    public_jwk: dict[str, str]


def generate_signing_key() -> GeneratedKey:
    private = ec.generate_private_key(ec.SECP256R1())
    kid = new_id()[:16]
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk = {"kty": public["kty"], "crv": public["crv"], "x": public["x"], "y": public["y"]}
    jwk.update(kid=kid, alg=ALGORITHM, use="sig")
    return GeneratedKey(kid, pem, jwk)


def public_only(jwk: dict[str, str]) -> dict[str, str]:
    """Never let anything but the public members out (a stray ``d`` would be a disaster)."""
    return {k: jwk[k] for k in PUBLIC_JWK_FIELDS if k in jwk}


def sign_access_token(private_pem: bytes, kid: str, claims: dict[str, Any]) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("signing keys are EC P-256 keys")
    return jwt.encode(
        {**claims, "typ": ACCESS_TOKEN_TYPE}, key, algorithm=ALGORITHM, headers={"kid": kid}
    )


def token_claims(token: str) -> dict[str, Any]:
    """Claims of a token the verifier already accepted (no second signature check)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# ---- passwords ----


class Passwords:
    def __init__(self, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        # Verifying against this keeps unknown-email logins as slow as wrong-password ones.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash or self._decoy, password) and bool(stored_hash)
        except (VerificationError, InvalidHashError):
            return False


# ---- opaque tokens and API keys ----


def digest(secret: str) -> str:
    """Refresh tokens and API keys carry >= 200 bits of entropy: a plain SHA-256 suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_refresh_token() -> str:
    return "crt_" + secrets.token_urlsafe(32)


def new_api_key() -> tuple[str, str]:
    """(plaintext, lookup): ``crl_`` + 43 base62 characters; the first 8 find the key."""
    body = "".join(secrets.choice(BASE62) for _ in range(API_KEY_CHARS))
    return API_KEY_PREFIX + body, body[:API_KEY_LOOKUP_CHARS]


def api_key_lookup(plaintext: str) -> str | None:
    body = plaintext.removeprefix(API_KEY_PREFIX)
    if (
        not plaintext.startswith(API_KEY_PREFIX)
        or len(body) != API_KEY_CHARS
        or any(c not in BASE62 for c in body)
    ):
        return None
    return body[:API_KEY_LOOKUP_CHARS]


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
