"""Where each service's composition root lives, so one binary can run any subset of them."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from corral.libs.app import ServiceApp
from corral.libs.config import SERVICE_NAMES, Settings

SERVICES_DIR = Path(__file__).resolve().parent


class CompositionRoot(Protocol):
    async def build(self, settings: Settings, *, port: int | None = None) -> ServiceApp: ...


def composition_root(name: str) -> CompositionRoot:
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICE_NAMES)}")
    module: CompositionRoot = importlib.import_module(f"corral.services.{name}.main")
    return module


def migrations_dir(name: str) -> Path:
    return SERVICES_DIR / name / "migrations"


async def build(name: str, settings: Settings, *, port: int | None = None) -> ServiceApp:
    return await composition_root(name).build(settings, port=port)
