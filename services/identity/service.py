"""Identity's service layer, one use-case module per concern, behind one facade.

- :mod:`.accounts`: organizations and users (and the first start's bootstrap)
- :mod:`.service_accounts`: service accounts and their API keys
- :mod:`.signing`: signing keys, rotation, the JWKS
- :mod:`.authentication`: login, refresh, logout, API-key exchange, bearer-token checks
- :mod:`.ledger`: quotas, usage reservations (reserve/settle/release/expire), usage reports
- :mod:`.audit`: the audit log

They share :mod:`.base` (the caller's context, the audit-event helper, idempotent creates).
"""

from __future__ import annotations

from corral.libs.idempotency import RETENTION_SECONDS
from corral.services.identity import tokens
from corral.services.identity.accounts import Accounts
from corral.services.identity.audit import AuditLog
from corral.services.identity.authentication import Authentication
from corral.services.identity.base import Clock, Config, UnitOfWorkFactory
from corral.services.identity.domain import now
from corral.services.identity.ledger import Ledger
from corral.services.identity.metrics import IdentityMetrics
from corral.services.identity.revocations import NO_FEED, RevocationFeed
from corral.services.identity.service_accounts import ServiceAccounts
from corral.services.identity.signing import SigningKeys
from corral.services.identity.throttle import LoginThrottle


class IdentityService:
    """What the servicer and the composition root hold: every use-case module, built on the
    same unit of work, configuration and clock."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        config: Config,
        passwords: tokens.Passwords,
        cipher: tokens.KeyCipher,
        throttle: LoginThrottle,
        clock: Clock = now,
        revocations: RevocationFeed = NO_FEED,
        metrics: IdentityMetrics | None = None,
    ) -> None:
        """``metrics``: where the use cases count (default: the process's meter)."""
        self.config = config
        self.clock = clock
        self._uow = uow
        self.accounts = Accounts(uow, config, clock, passwords, revocations)
        self.service_accounts = ServiceAccounts(uow, config, clock, revocations)
        self.keys = SigningKeys(uow, config, clock, cipher, revocations)
        self.auth = Authentication(uow, config, clock, passwords, throttle, self.keys, revocations)
        self.ledger = Ledger(uow, config, clock)
        self.audit = AuditLog(uow, config, clock)
        if metrics is not None:
            for part in (self.accounts, self.service_accounts, self.keys, self.auth):
                part.metrics = metrics
            self.ledger.metrics = self.audit.metrics = metrics

    async def housekeeping(self) -> None:
        """Give back expired usage holds; forget login failures past the throttle's window and
        request ids past their retention."""
        await self.ledger.expire_reservations()
        await self.auth.prune_login_failures()
        async with self._uow() as uow:
            await uow.idempotency.purge(self.clock() - RETENTION_SECONDS)
            await uow.commit()
