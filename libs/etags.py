"""Etags (AIP-154): one format and one check for every resource that takes them.

An etag is opaque to clients: 16 hex digits derived from the resource's key and its version
counter, so two resources never share one and a client cannot guess the next. A change that
sends an etag must send the current one, or it fails ``ABORTED`` (reason ``ETAG_MISMATCH``):
re-read and retry. An empty etag means "whatever is current".
"""

from __future__ import annotations

import hashlib

from corral.libs.errors import Aborted


def etag_of(key: str, version: int) -> str:
    return hashlib.sha256(f"{key}:{version}".encode()).hexdigest()[:16]


def check_etag(sent: str, current: str, what: str = "resource") -> None:
    """Raise ABORTED/ETAG_MISMATCH when ``sent`` is set and is not ``current``."""
    if sent and sent != current:
        raise mismatch(what)


def mismatch(what: str = "resource") -> Aborted:
    """The error for a change that lost a race (a conditional UPDATE that matched no row)."""
    return Aborted(
        f"the {what} changed since it was read; read it again and retry",
        reason="ETAG_MISMATCH",
    )
