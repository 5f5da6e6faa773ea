"""JWT verification against a JWKS: pinned algorithms, issuer, audience, expiry, ``kid`` lookup.

The key set is cached; an unknown ``kid`` triggers one refresh (at most once per
``min_refresh_seconds``) so rotated keys are picked up without letting a flood of forged
``kid`` values hammer the JWKS endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

import jwt

from corral.libs.auth.caller import Caller
from corral.libs.auth.revocation import RevocationList
from corral.libs.errors import OUTAGE_RETRY_SECONDS, Unauthenticated, Unavailable

# Asymmetric algorithms only: a symmetric (HS*) or "none" token is never accepted.
ALLOWED_ALGORITHMS = frozenset({"ES256", "ES384", "EdDSA", "RS256", "PS256"})
ACCESS_TOKEN_TYPE = "access"


class JwksSource(Protocol):
    async def fetch(self) -> Mapping[str, Any]:
        """Return a JWKS document: ``{"keys": [...]}``."""
        ...


class StaticJwksSource:
    """A JWKS held in memory (tests, or identity verifying with its own key store)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self.jwks = jwks

    async def fetch(self) -> Mapping[str, Any]:
        return self.jwks


class HttpJwksSource:
    """Fetches ``/.well-known/jwks.json`` over HTTP (identity serves it; Envoy reads it too)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    def _get(self) -> Mapping[str, Any]:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
            document: Mapping[str, Any] = json.loads(response.read())
            return document

    async def fetch(self) -> Mapping[str, Any]:
        return await asyncio.to_thread(self._get)


class TokenVerifier:
    def __init__(
        self,
        source: JwksSource,
        *,
        issuer: str,
        audience: str,
        algorithms: list[str] | None = None,
        cache_seconds: float = 300.0,
        min_refresh_seconds: float = 5.0,
        leeway_seconds: float = 5.0,
        verified_cache_size: int = 10_000,
        clock: Any = time.time,
        revocations: RevocationList | None = None,
    ) -> None:
        pinned = set(algorithms or ["ES256", "EdDSA"])
        if not pinned <= ALLOWED_ALGORITHMS:
            raise ValueError(
                f"only asymmetric algorithms may be pinned, not {pinned - ALLOWED_ALGORITHMS}"
            )
        self._source = source
        self._issuer = issuer
        self._audience = audience
        self._algorithms = pinned
        self._cache_seconds = cache_seconds
        self._min_refresh_seconds = min_refresh_seconds
        self._leeway = leeway_seconds
        self._clock = clock
        self._revocations = revocations
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        # Tokens already verified, until they expire: a signature check (ES256) costs far more
        # than the rest of a call. Cleared whenever the key set changes.
        self._verified: OrderedDict[str, Caller] = OrderedDict()
        self._verified_max = verified_cache_size

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            age = self._clock() - self._fetched_at
            if age < self._min_refresh_seconds or (not force and age < self._cache_seconds):
                return
            try:
                document = await self._source.fetch()
            except Exception as exc:  # the key server is down: keep the keys we had
                if self._keys:
                    return
                # Not the caller's fault, and no reason to sign in again: retry later.
                raise Unavailable(
                    "signing keys are unavailable; retry",
                    reason="JWKS_UNAVAILABLE",
                    retry_after_seconds=OUTAGE_RETRY_SECONDS,
                ) from exc
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                kid, alg = entry.get("kid"), entry.get("alg")
                if not kid or alg not in self._algorithms or entry.get("use", "sig") != "sig":
                    continue
                try:
                    keys[kid] = jwt.PyJWK(dict(entry), algorithm=alg)
                except jwt.PyJWTError:
                    continue
            if keys.keys() != self._keys.keys():
                self._verified.clear()
            self._keys = keys
            self._fetched_at = self._clock()

    async def _key_for(self, kid: str) -> jwt.PyJWK:
        await self._refresh(force=False)
        if kid not in self._keys:
            await self._refresh(force=True)
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("the token's signing key is unknown", reason="TOKEN_KEY_UNKNOWN")
        return key

    async def verify(self, token: str) -> Caller:
        caller = self._verified.get(token)
        if caller is not None and not (
            caller.expires_at + self._leeway > self._clock()
            and self._clock() - self._fetched_at < self._cache_seconds
        ):
            del self._verified[token]
            caller = None
        if caller is None:
            caller = await self._verify(token)
            self._verified[token] = caller
            if len(self._verified) > self._verified_max:
                self._verified.popitem(last=False)
        if self._revocations is not None:
            await self._revocations.check(caller)
        return caller

    async def _verify(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is malformed", reason="TOKEN_MALFORMED") from exc
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise Unauthenticated(
                f"tokens signed with {alg!r} are not accepted", reason="TOKEN_ALGORITHM"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token has no key id", reason="TOKEN_KEY_UNKNOWN")
        key = await self._key_for(kid)
        if key.algorithm_name != alg:
            raise Unauthenticated(
                "the token's algorithm does not match its key", reason="TOKEN_ALGORITHM"
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated(
                "the token is for another audience", reason="TOKEN_AUDIENCE"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("the token has an unknown issuer", reason="TOKEN_ISSUER") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is invalid", reason="TOKEN_INVALID") from exc
        if claims.get("typ") != ACCESS_TOKEN_TYPE:
            raise Unauthenticated("only access tokens are accepted here", reason="TOKEN_TYPE")
        roles = claims.get("roles") or []
        return Caller(
            subject=str(claims["sub"]),
            organization=str(claims.get("org", "")),
            roles=frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset(),
            token_id=str(claims["jti"]),
            token=token,
            expires_at=float(claims["exp"]),
            issued_at=float(claims["iat"]),
            session_id=str(claims.get("sid") or ""),
            api_key_id=str(claims.get("akid") or ""),
            key_id=kid,
            requests_per_minute=_positive(claims.get("rpm")),
            organization_requests_per_minute=_positive(claims.get("org_rpm")),
        )


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
