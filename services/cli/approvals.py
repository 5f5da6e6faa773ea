"""Answering an agent's permission requests from the command line.

In order: ``--deny PATTERN`` and ``--approve PATTERN`` (tool-name globs: ``Bash``,
``mcp__calc__*``; a deny wins), then a person at a terminal (``y``/``n``), then, when standard
input is not a terminal, the next line of it (``y``/``yes`` allows, anything else denies).
When nothing can answer (no pattern matches and standard input has ended or was never
given), the request is denied at once, saying so: the CLI never waits on a question no one
will read.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TextIO

from google.protobuf import json_format

from corral.services.cli.output import Output
from corral.session.v1 import permission_pb2


@dataclass(frozen=True)
class Decision:
    allow: bool
    message: str
    source: str  # "pattern", "terminal", "stdin", "nobody"


@dataclass
class Approver:
    approve: Sequence[str] = ()
    deny: Sequence[str] = ()
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    _ended: bool = False

    def by_pattern(self, tool: str) -> Decision | None:
        for pattern in self.deny:
            if fnmatchcase(tool, pattern):
                return Decision(False, f"denied by --deny {pattern}", "pattern")
        for pattern in self.approve:
            if fnmatchcase(tool, pattern):
                return Decision(True, "", "pattern")
        return None

    async def decide(self, request: permission_pb2.PermissionRequest, out: Output) -> Decision:
        ruled = self.by_pattern(request.tool_name)
        if ruled is not None:
            return ruled
        terminal = bool(getattr(self.stdin, "isatty", lambda: False)())
        if self._ended:
            return self._nobody()
        args = json.dumps(json_format.MessageToDict(request.input))[:300]
        out.note(f"? allow {request.tool_name} {args}  [y/n]", "yellow")
        line = await asyncio.to_thread(self.stdin.readline)
        if not line:  # end of input: nobody is left to answer
            self._ended = True
            return self._nobody()
        allow = line.strip().lower() in ("y", "yes")
        source = "terminal" if terminal else "stdin"
        return Decision(allow, "" if allow else "the user said no", source)

    def _nobody(self) -> Decision:
        return Decision(
            False, "no one to ask: denied (use --approve/--deny, or answer on stdin)", "nobody"
        )
