"""Secrets and tokens: signing keys (ES256, sealed at rest), access JWTs, passwords, opaque tokens.

Private signing keys are stored PEM-encoded and sealed under the deployment's key ring
(``CORRAL_ENCRYPTION_KEYS``, :mod:`corral.libs.crypto`); production does not start without it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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
from corral.libs.crypto import KeyRing, KeyRingError
from corral.libs.names import new_id

ALGORITHM = "ES256"
PUBLIC_JWK_FIELDS = ("kty", "crv", "x", "y", "kid", "alg", "use")
_SEALED = b"aesgcm:"  # before the key ring: CORRAL_IDENTITY_KEY_ENCRYPTION_KEY
_PLAIN = b"plain:"  # before the key ring: development, no key
BASE62 = string.ascii_letters + string.digits
API_KEY_PREFIX = "crl_"
API_KEY_LOOKUP_CHARS = 8
API_KEY_CHARS = 43


class KeyCipher:
    """Seals private signing keys at rest under the deployment's key ring
    (:class:`~corral.libs.crypto.KeyRing`, ``CORRAL_ENCRYPTION_KEYS``: AES-256-GCM, the key id
    stored with the value, the key's resource name as authenticated data).

    Values sealed before the key ring still open: ``aesgcm:`` ones with the former
    ``CORRAL_IDENTITY_KEY_ENCRYPTION_KEY`` (``legacy_key_b64``), ``plain:`` ones (development
    stored them in the clear). :meth:`needs_resealing` says which to rewrite under the primary
    key (identity does it at start-up)."""

    def __init__(self, ring: KeyRing, legacy_key_b64: str = "") -> None:
        self._ring = ring
        self._legacy: AESGCM | None = None
        if legacy_key_b64:
            raw = base64.urlsafe_b64decode(legacy_key_b64 + "=" * (-len(legacy_key_b64) % 4))
            if len(raw) != 32:
                raise ValueError("the key-encryption key must be 32 bytes, base64-encoded")
            self._legacy = AESGCM(raw)

    @staticmethod
    def _context(kid: str) -> str:
        return f"signingKeys/{kid}:private_key"

    def seal(self, kid: str, plaintext: bytes) -> bytes:
        return self._ring.seal(plaintext, self._context(kid))

    def open(self, kid: str, stored: bytes) -> bytes:
        if stored.startswith(_PLAIN):
            return stored[len(_PLAIN) :]
        if stored.startswith(_SEALED):
            if self._legacy is None:
                raise KeyRingError(
                    "this signing key was sealed with CORRAL_IDENTITY_KEY_ENCRYPTION_KEY, which is"
                    " not set: set it once so identity re-seals the key under the key ring"
                )
            raw = base64.b64decode(stored[len(_SEALED) :])
            return self._legacy.decrypt(raw[:12], raw[12:], kid.encode())
        return self._ring.open(stored, self._context(kid))

    def needs_resealing(self, stored: bytes) -> bool:
        """True for a value sealed the old way or with another key than the primary one."""
        if not stored:
            return False  # wiped: the key is no longer published
        if stored.startswith((_PLAIN, _SEALED)):
            return True
        return self._ring.needs_rotation(stored)


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
