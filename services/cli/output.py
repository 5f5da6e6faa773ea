"""How the CLI writes: JSON for scripts (``--json``), text for people, colour only for a
terminal (never into a pipe or a file, never with ``NO_COLOR`` set or ``--no-color``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

STYLES = {"dim": "2", "bold": "1", "cyan": "36", "yellow": "33", "red": "31", "green": "32"}


def as_json(value: Any) -> Any:
    """Protobuf messages as the REST surface shows them (camelCase, proto3 JSON)."""
    if isinstance(value, Message):
        return json_format.MessageToDict(value)
    if isinstance(value, Mapping):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


def wants_colour(stream: TextIO, disabled: bool = False) -> bool:
    """https://no-color.org: any non-empty NO_COLOR turns colour off; so does a non-terminal."""
    if disabled or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Output:
    def __init__(
        self,
        *,
        json_mode: bool = False,
        no_color: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.json = json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.colour = wants_colour(self.out, no_color)
        self.err_colour = wants_colour(self.err, no_color)

    def style(self, text: str, *styles: str, err: bool = False) -> str:
        if not styles or not (self.err_colour if err else self.colour):
            return text
        codes = ";".join(STYLES[s] for s in styles)
        return f"\033[{codes}m{text}\033[0m"

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def note(self, text: str, *styles: str) -> None:
        """For people, whatever the mode: stderr."""
        self.err.write(self.style(text, *styles, err=True) + "\n")
        self.err.flush()

    def document(self, value: Any) -> None:
        """One JSON document (``--json``)."""
        self.line(json.dumps(as_json(value), indent=2, sort_keys=True))

    def record(self, value: Any) -> None:
        """One JSON line of a stream (``--json``)."""
        self.line(json.dumps(as_json(value), sort_keys=True))

    def table(self, rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        self.line(
            self.style(
                "  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)), "bold"
            )
        )
        for row in rows:
            self.line("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
