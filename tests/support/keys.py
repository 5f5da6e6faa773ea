"""Test signing keys and tokens (what identity issues, made here so the kit is tested alone)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "corral-identity"
AUDIENCE = "corral"


@dataclass
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(kid=uuid.uuid4().hex[:16], private_key=ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        return {**public, "kid": self.kid, "alg": "ES256", "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def token(
        self, *, kid: str | None = None, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "organizations/acme/users/alice",
            "org": "organizations/acme",
            "roles": ["user"],
            "typ": "access",
            "iat": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims)
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            self.private_key,
            algorithm="ES256",
            headers={"kid": kid or self.kid, **(headers or {})},
        )
