"""The offline model server: the Anthropic Messages API, played by a deterministic script.

No machine here reaches the real model, so development and tests point the Claude Agent SDK's
bundled CLI (``ANTHROPIC_BASE_URL``) at this server instead. Everything else the SDK does (tools,
MCP, permissions, transcripts) stays real. See ``script`` for the prompt directive that scripts it
and ``server`` for the HTTP side; ``python -m corral.services.runtime.offline_model`` runs it.
"""

from corral.services.runtime.offline_model.server import start

__all__ = ["start"]
