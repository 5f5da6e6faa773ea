"""Repositories of credentials: refresh-token families, signing keys, failed sign-ins."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from corral.services.identity import rows
from corral.services.identity.domain import KeyState, RefreshToken, SigningKeyRecord, User
from corral.services.identity.sql import DuplicateKey, Repo
from corral.services.identity.tables import (
    login_failures,
    refresh_families,
    refresh_tokens,
    signing_keys,
)


class RefreshTokens(Repo):
    async def new_family(self, family_id: str, user: User, at: float) -> None:
        await self._insert(
            refresh_families,
            {
                "id": family_id,
                "user_id": user.id,
                "organization_id": user.organization_id,
                "create_time": at,
                "revoke_time": None,
            },
        )

    async def add(self, token: RefreshToken) -> None:
        await self._insert(refresh_tokens, rows.refresh_token_values(token))

    async def by_hash(self, token_hash: str) -> RefreshToken | None:
        query = (
            sa.select(refresh_tokens, refresh_families.c.revoke_time)
            .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
        row = await self._one(query)
        return rows.refresh_token(row) if row else None

    async def use(self, token_id: str, at: float) -> bool:
        """Marks a token used; False if it already was (a concurrent refresh won)."""
        result = await self.c.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.id == token_id, refresh_tokens.c.used_time.is_(None))
            .values(used_time=at)
        )
        return bool(result.rowcount)

    async def revoke_family(self, family_id: str, at: float) -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(refresh_families.c.id == family_id, refresh_families.c.revoke_time.is_(None))
            .values(revoke_time=at)
        )
        return int(result.rowcount)

    async def revoke_user(self, user_id: str, at: float, *, keep_family: str = "") -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(
                refresh_families.c.user_id == user_id,
                refresh_families.c.revoke_time.is_(None),
                refresh_families.c.id != keep_family,
            )
            .values(revoke_time=at)
        )
        return int(result.rowcount)

    async def revoke_org(self, org_id: str, at: float) -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(
                refresh_families.c.organization_id == org_id,
                refresh_families.c.revoke_time.is_(None),
            )
            .values(revoke_time=at)
        )
        return int(result.rowcount)


class SigningKeys(Repo):
    async def all(self) -> list[SigningKeyRecord]:
        found = await self.c.execute(
            sa.select(signing_keys).order_by(signing_keys.c.create_time.desc())
        )
        return [rows.signing_key(r) for r in found]

    async def in_state(self, state: KeyState) -> list[SigningKeyRecord]:
        found = await self.c.execute(
            sa.select(signing_keys)
            .where(signing_keys.c.state == state.value)
            .order_by(signing_keys.c.create_time.desc())
        )
        return [rows.signing_key(r) for r in found]

    async def add(self, key: SigningKeyRecord) -> None:
        await self._insert(signing_keys, rows.signing_key_values(key))

    async def wipe_unpublished(self, at: float) -> None:
        await self.c.execute(
            signing_keys.update()
            .where(signing_keys.c.unpublish_time <= at, signing_keys.c.private_key != b"")
            .values(private_key=b"")
        )

    async def reseal(self, kid: str, old: bytes, new: bytes) -> bool:
        """Replace the sealed private half, unless it changed meanwhile (another replica)."""
        result = await self.c.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == kid, signing_keys.c.private_key == old)
            .values(private_key=new)
        )
        return bool(result.rowcount)

    async def transition(self, key: SigningKeyRecord, expected: KeyState) -> bool:
        try:
            result = await self._transition(key, expected)
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(str(exc.orig)) from exc
        return bool(result.rowcount)

    async def _transition(self, key: SigningKeyRecord, expected: KeyState) -> Any:
        return await self.c.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == key.kid, signing_keys.c.state == expected.value)
            .values(
                state=key.state.value,
                activate_time=key.activate_time,
                retire_time=key.retire_time,
                unpublish_time=key.unpublish_time,
            )
        )


class LoginFailures(Repo):
    async def recent(self, scope: str, key: str, since: float) -> tuple[int, float | None]:
        """How many failures for ``key`` since ``since``, and when the first of them was."""
        query = sa.select(
            sa.func.count().label("failures"), sa.func.min(login_failures.c.time).label("oldest")
        ).where(
            login_failures.c.scope == scope,
            login_failures.c.key == key,
            login_failures.c.time > since,
        )
        row = (await self.c.execute(query)).one()._mapping
        oldest = row["oldest"]
        return int(row["failures"]), (float(oldest) if oldest is not None else None)

    async def add(self, scope: str, key: str, at: float) -> None:
        await self.c.execute(login_failures.insert().values(scope=scope, key=key[:320], time=at))

    async def clear(self, scope: str, key: str) -> None:
        await self.c.execute(
            login_failures.delete().where(
                login_failures.c.scope == scope, login_failures.c.key == key
            )
        )

    async def prune(self, before: float) -> None:
        await self.c.execute(login_failures.delete().where(login_failures.c.time <= before))
