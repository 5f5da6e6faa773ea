"""Alembic environment of the runtime service: its own tables only (run by `corral migrate`)."""

from alembic import context

from corral.libs.db import run_alembic_env

run_alembic_env(context, None)  # no tables yet: the baseline revision only versions the schema
