"""Composition root of the session service (API published; behaviour comes with its own issue)."""

from __future__ import annotations

from corral.libs.app import ServiceApp
from corral.libs.config import Settings
from corral.services.unimplemented import build_unimplemented


async def build(settings: Settings, *, port: int | None = None) -> ServiceApp:
    return await build_unimplemented("session", "SessionService", settings, port)
