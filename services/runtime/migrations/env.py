"""Alembic environment of the runtime service: its own tables only (run by `corral migrate`)."""

from alembic import context

from corral.libs.db import run_alembic_env
from corral.services.runtime.repository import metadata

run_alembic_env(context, metadata)
