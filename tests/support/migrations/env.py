"""A throwaway context's migrations, to test the kit's migration machinery on both databases."""

from alembic import context

from corral.libs.db import run_alembic_env
from tests.support.notes import metadata

run_alembic_env(context, metadata)
