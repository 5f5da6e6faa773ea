"""``python -m corral.services.cli`` runs the ``corral`` command."""

import sys

from corral.services.cli import main

sys.exit(main())
