"""Resource names (AIP-122): one id alphabet, one parser and formatter for every service.

A name is a pattern of literal collection segments and ``{variable}`` id segments, e.g.
``organizations/{organization}/users/{user}``. Every id segment uses the same alphabet
(:data:`ID_PATTERN`): letters, digits, ``_`` and ``-``, starting with a letter or digit, at most
64 characters. That makes an id safe as a file name and a path segment (no ``.``, no ``/``).
"""

from __future__ import annotations

import re
import uuid

from corral.libs.errors import FieldViolation, InvalidArgument, Validator

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_ID = re.compile(rf"^{ID_PATTERN}$")
_VARIABLE = re.compile(r"^\{([a-z_]+)\}$")


def new_id() -> str:
    """A fresh random id in the shared alphabet (32 hex digits)."""
    return uuid.uuid4().hex


def is_id(text: str) -> bool:
    return bool(_ID.match(text))


class ResourcePattern:
    """One resource name pattern: ``format`` builds a name, ``parse`` takes its ids back out."""

    def __init__(self, template: str) -> None:
        self.template = template
        parts = template.split("/")
        self.variables = tuple(m.group(1) for p in parts if (m := _VARIABLE.match(p)))
        regex = "/".join(f"({ID_PATTERN})" if _VARIABLE.match(p) else re.escape(p) for p in parts)
        self._regex = re.compile(rf"^{regex}$")

    def format(self, *ids: str) -> str:
        if len(ids) != len(self.variables):
            raise ValueError(f"{self.template} takes {len(self.variables)} ids, not {len(ids)}")
        values = iter(ids)
        return "/".join(next(values) if _VARIABLE.match(p) else p for p in self.template.split("/"))

    def parse(self, name: str) -> tuple[str, ...] | None:
        """The ids of ``name``, or None when it is not a name of this pattern."""
        match = self._regex.match(name)
        return match.groups() if match else None

    def matches(self, name: str) -> bool:
        return self.parse(name) is not None

    def parse_field(self, name: str, field_path: str) -> tuple[str, ...]:
        """The ids of ``name``, or INVALID_ARGUMENT naming ``field_path`` and the pattern."""
        return parse_any(name, field_path, self)[1]

    def __repr__(self) -> str:
        return f"ResourcePattern({self.template!r})"


def parse_any(
    name: str, field_path: str, *patterns: ResourcePattern
) -> tuple[int, tuple[str, ...]]:
    """Which of ``patterns`` ``name`` matches (its index) and its ids, or INVALID_ARGUMENT."""
    for index, pattern in enumerate(patterns):
        ids = pattern.parse(name)
        if ids is not None:
            return index, ids
    forms = " or ".join(p.template for p in patterns)
    raise InvalidArgument(
        f"{field_path} is not a valid resource name",
        violations=[FieldViolation(field_path, f"must be a resource name of the form {forms}")],
    )


def ids_of(
    pattern: ResourcePattern, name: str, field_path: str, check: Validator
) -> tuple[str, ...]:
    """The ids of ``name``; when it is not a name of ``pattern``, empty ids and a violation on
    ``check`` (so a request reports every bad field at once)."""
    try:
        return pattern.parse_field(name, field_path)
    except InvalidArgument as exc:
        check.violations.extend(exc.violations)
        return ("",) * len(pattern.variables)
