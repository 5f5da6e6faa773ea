"""Alembic environment of the storage service: its own tables only (run by `corral migrate`)."""

from alembic import context

from corral.libs.db import run_alembic_env
from corral.services.storage.tables import metadata

run_alembic_env(context, metadata)
