"""Token signing keys: one active key signs, one pending key is already published; rotation
promotes the pending key, retires the active one (published a while longer) and makes a new
pending key. The JWKS is every published key's public half."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from corral.libs import listing
from corral.libs.errors import Aborted
from corral.libs.names import new_id
from corral.services.identity import tokens
from corral.services.identity.base import (
    PLATFORM,
    Clock,
    Config,
    Context,
    ListResult,
    UnitOfWorkFactory,
    UseCases,
)
from corral.services.identity.domain import SIGNING_KEY, KeyState, SigningKeyRecord
from corral.services.identity.queries import ListRequest, ListSpec
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork
from corral.services.identity.revocations import NO_FEED, RevocationFeed

log = logging.getLogger("corral.identity")

SIGNING_KEYS = ListSpec(
    {"state": listing.FieldSpec("state", listing.enum_value({s.name: s.value for s in KeyState}))},
    {"create_time": "create_time"},
    "create_time desc",
)


@dataclass
class Rotation:
    active: SigningKeyRecord
    pending: SigningKeyRecord
    previous: SigningKeyRecord | None


def _position(key: SigningKeyRecord) -> tuple[float, str]:
    return key.create_time, key.kid


class SigningKeys(UseCases):
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        config: Config,
        clock: Clock,
        cipher: tokens.KeyCipher,
        revocations: RevocationFeed = NO_FEED,
    ) -> None:
        super().__init__(uow, config, clock, revocations)
        self._cipher = cipher

    def _new_key(self, state: KeyState, at: float) -> SigningKeyRecord:
        generated = tokens.generate_signing_key()
        return SigningKeyRecord(
            kid=generated.kid,
            algorithm=tokens.ALGORITHM,
            state=state,
            private_key=self._cipher.seal(generated.kid, generated.private_pem),
            public_jwk=generated.public_jwk,
            create_time=at,
            activate_time=at if state is KeyState.ACTIVE else None,
        )

    async def ensure_signing_keys(self) -> None:
        """First start: one active key and one pending (already published) key. Every start:
        private halves sealed the old way or with a former key of the ring are re-sealed with
        the primary key (then an operator can drop the former key)."""
        await self.reseal()
        async with self._uow() as uow:
            if await uow.signing_keys.in_state(KeyState.ACTIVE):
                return
            at = self._clock()
            try:
                await uow.signing_keys.add(self._new_key(KeyState.ACTIVE, at))
                await uow.signing_keys.add(self._new_key(KeyState.PENDING, at))
            except DuplicateKey:
                return  # another replica created them first
            await uow.commit()

    async def reseal(self) -> int:
        """Re-seal what :meth:`tokens.KeyCipher.needs_resealing`; how many keys were."""
        resealed = 0
        async with self._uow() as uow:
            for key in await uow.signing_keys.all():
                if not self._cipher.needs_resealing(key.private_key):
                    continue
                pem = self._cipher.open(key.kid, key.private_key)
                fresh = self._cipher.seal(key.kid, pem)
                resealed += await uow.signing_keys.reseal(key.kid, key.private_key, fresh)
            await uow.commit()
        if resealed:
            log.info("signing keys re-sealed with the primary key", extra={"count": resealed})
        return resealed

    async def jwks(self) -> list[dict[str, str]]:
        """Public halves of every pending, active and still-published retired key."""
        at = self._clock()
        async with self._uow() as uow:
            keys = await uow.signing_keys.all()
        return [tokens.public_only(k.public_jwk) for k in keys if k.published_at(at)]

    async def list_signing_keys(
        self, ctx: Context, request: ListRequest
    ) -> ListResult[SigningKeyRecord]:
        """Newest first. The keys are few, so they are filtered and paged in memory."""
        ctx.require().require_superuser()
        query = SIGNING_KEYS.query(request)
        page = query.page
        async with self._uow() as uow:
            keys = await uow.signing_keys.all()
        keys = [
            k
            for k in keys
            if all((k.state.value == c.value) == (c.op == "=") for c in query.conditions)
        ]
        keys.sort(key=_position, reverse=True)
        after = page.after
        rest = [k for k in keys if after is None or _position(k) < (after[0], after[1])]
        chunk, token = listing.finish_page(rest[: page.size + 1], page, _position)
        return ListResult(chunk, token, len(keys))

    async def rotate_signing_keys(self, ctx: Context, revoke_previous: bool) -> Rotation:
        ctx.require().require_superuser()
        at = self._clock()
        async with self._uow() as uow:
            active = await uow.signing_keys.in_state(KeyState.ACTIVE)
            pending = await uow.signing_keys.in_state(KeyState.PENDING)
            if not active or not pending:
                raise Aborted("the signing keys are being initialised; retry", reason="ABORTED")
            previous, promoted = active[0], pending[0]
            previous_expected = previous.state
            previous.state = KeyState.REVOKED if revoke_previous else KeyState.RETIRED
            previous.retire_time = at
            previous.unpublish_time = at if revoke_previous else at + self.config.key_retirement
            promoted.state, promoted.activate_time = KeyState.ACTIVE, at
            busy = Aborted("another rotation is in progress; retry", reason="ABORTED")
            fresh = self._new_key(KeyState.PENDING, at)
            try:
                if not (
                    await uow.signing_keys.transition(previous, previous_expected)
                    and await uow.signing_keys.transition(promoted, KeyState.PENDING)
                ):
                    raise busy
                await uow.signing_keys.add(fresh)
            except DuplicateKey as exc:
                raise busy from exc
            await uow.signing_keys.wipe_unpublished(at)  # no private key outlives its use
            await self._audit(
                uow,
                ctx,
                PLATFORM,
                "signing_keys.rotate",
                SIGNING_KEY.format(promoted.kid),
                previous=previous.kid,
                previous_state=previous.state.value,
            )
            await uow.commit()
        if revoke_previous:  # every token the old key signed dies, wherever it is checked
            await self._revoke("signing_key", previous.kid)
        log.info("signing keys rotated", extra={"active": promoted.kid, "pending": fresh.kid})
        return Rotation(active=promoted, pending=fresh, previous=previous)

    async def sign(self, uow: IdentityUnitOfWork, claims: dict[str, Any]) -> tuple[str, float]:
        """An access token with ``claims``, signed by the active key; and when it expires."""
        active = await uow.signing_keys.in_state(KeyState.ACTIVE)
        if not active:
            raise RuntimeError("no active signing key")
        key = active[0]
        at = self._clock()
        expires = int(at + self.config.access_ttl)
        body = {
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "iat": at,  # sub-second: a token issued just after a revocation is not void
            "exp": expires,
            "jti": new_id(),
            **claims,
        }
        pem = self._cipher.open(key.kid, key.private_key)
        return tokens.sign_access_token(pem, key.kid, body), float(expires)
