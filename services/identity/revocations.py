"""Identity's side of the revocation feed (:mod:`corral.libs.auth.revocation`): after a change
that voids tokens commits, tell every service at once.

A publish that fails (Redis down, slow) never fails the use case: the change is made and
committed, identity's own per-call check (generations, key and account states) still refuses
the tokens, and the other services refuse them when they expire. The failure is logged.
"""

from __future__ import annotations

import asyncio
import logging

from corral.libs.auth.revocation import Revocation, RevocationStore

log = logging.getLogger("corral.identity.revocations")

PUBLISH_TIMEOUT_SECONDS = 2.0


class RevocationFeed:
    """Publishes :class:`Revocation` entries; with no store (the admin CLI without Redis) it
    logs that the other services learn nothing until the tokens expire."""

    def __init__(
        self, store: RevocationStore | None, *, timeout: float = PUBLISH_TIMEOUT_SECONDS
    ) -> None:
        self._store = store
        self._timeout = timeout

    async def publish(self, kind: str, ident: str, not_before: float) -> str:
        """Tokens whose ``kind`` claim is ``ident`` and that were issued at or before
        ``not_before`` are void everywhere (once each service re-reads the feed). Returns what
        became of it: ``published``, ``failed`` or ``unpublished`` (no feed)."""
        revocation = Revocation(kind, ident, not_before)
        if self._store is None:
            log.warning(
                "no revocation feed: other services accept the revoked tokens until they expire",
                extra={"kind": kind, "id": ident},
            )
            return "unpublished"
        try:
            await asyncio.wait_for(self._store.publish(revocation), self._timeout)
        except Exception:
            log.exception(
                "the revocation could not be published: other services accept the revoked"
                " tokens until they expire (identity refuses them)",
                extra={"kind": kind, "id": ident},
            )
            return "failed"
        return "published"


NO_FEED = RevocationFeed(None)
