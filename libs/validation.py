"""Field checks every service applies the same way: labels, text, request ids, update masks.

Each check adds :class:`~corral.libs.errors.FieldViolation`s to a
:class:`~corral.libs.errors.Validator`, so one request reports all its bad fields at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from corral.libs.errors import Validator

MAX_LABELS = 64
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_LABEL_VALUE = 63
MAX_REQUEST_ID = 128
# C0 controls but tab, newline and carriage return, DEL, and the C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"[\t\n\r]")


def check_labels(labels: Mapping[str, str], check: Validator, field_path: str) -> None:
    """At most 64 labels; keys ``[a-z][a-z0-9_-]{0,62}``; values at most 63 characters of
    printable text (what the protos document for every ``labels`` field)."""
    check.check(len(labels) <= MAX_LABELS, field_path, f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        check.check(
            bool(LABEL_KEY.match(key)),
            f"{field_path}.{key}" if key.isprintable() else field_path,
            "keys are 1-63 characters: a lowercase letter, then lowercase letters, digits, "
            "'_' or '-'",
        )
        check_text(value, check, f"{field_path}.{key}", max_length=MAX_LABEL_VALUE, lines=False)


def check_text(
    value: str,
    check: Validator,
    field_path: str,
    *,
    max_length: int,
    required: bool = False,
    lines: bool = True,
) -> None:
    """Length (in characters) and content: never NUL or other control characters; tabs and
    line breaks only where ``lines`` (free text such as a prompt)."""
    if required and not value:
        check.add(field_path, "is required")
        return
    check.check(len(value) <= max_length, field_path, f"at most {max_length:,} characters")
    bad = _CONTROL.search(value) or (None if lines else _LINE_BREAK.search(value))
    check.check(bad is None, field_path, "must not contain control characters")


def check_request_id(value: str, check: Validator, field_path: str = "request_id") -> None:
    check_text(value, check, field_path, max_length=MAX_REQUEST_ID, lines=False)


def check_update_mask(
    sent: field_mask_pb2.FieldMask,
    allowed: frozenset[str],
    check: Validator,
    *,
    nested: bool = False,
) -> frozenset[str]:
    """The paths of an update mask (``*``: every field in ``allowed``): at least one, each an
    allowed field or, with ``nested``, a path into one (``agent_options.model``)."""
    paths = frozenset(sent.paths)
    check.check(bool(paths), "update_mask", "name the fields to change")
    if "*" in paths:
        return allowed
    for path in sorted(paths):
        check.check(
            (path.split(".", 1)[0] if nested else path) in allowed,
            "update_mask",
            f"{path!r} cannot be changed; updatable: {', '.join(sorted(allowed))}",
        )
    return paths


def nul_fields(message: Message, prefix: str = "") -> list[str]:
    """The paths of every string in ``message`` (nested messages, lists and maps included)
    that holds a NUL character: never valid text, and PostgreSQL refuses it outright."""
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                where = f"{path}[{str(key)[:40]!r}]"
                if isinstance(key, str) and "\x00" in key:
                    found.append(path)
                if isinstance(item, str) and "\x00" in item:
                    found.append(where)
                elif isinstance(item, Message):
                    found.extend(nul_fields(item, f"{where}."))
        elif field.is_repeated:
            for index, item in enumerate(value):
                if isinstance(item, str) and "\x00" in item:
                    found.append(f"{path}[{index}]")
                elif isinstance(item, Message):
                    found.extend(nul_fields(item, f"{path}[{index}]."))
        elif isinstance(value, str) and "\x00" in value:
            found.append(path)
        elif isinstance(value, Message):
            found.extend(nul_fields(value, f"{path}."))
    return found
