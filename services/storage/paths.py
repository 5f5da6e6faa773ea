"""Workspace paths and file names: the one place a user's path is judged.

A path is relative to its workspace, ``/``-separated, UTF-8 in NFC, at most 1,024 bytes (255 per
segment), with no empty, ``.`` or ``..`` segment, no leading or trailing ``/``, no backslash,
no control character (C0, DEL, C1) and no invisible format character or line/paragraph
separator (Unicode categories Cf, Zl, Zp: U+200B, U+202E, U+FEFF, U+2028...), which would make
a name look like another one. Nothing is "fixed up": a path that breaks a rule is refused
(INVALID_ARGUMENT, INVALID_PATH), so a name always means exactly one file.

A file's resource name carries the path as base64url without padding
(``workspaces/{workspace}/files/{file}``), stable for a path and safe in a URL.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

from corral.libs.errors import FieldViolation, InvalidArgument
from corral.libs.names import ID_PATTERN

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_INVISIBLE = frozenset({"Cf", "Zl", "Zp"})  # format characters, line and paragraph separators
_FILE_NAME = re.compile(rf"^workspaces/({ID_PATTERN})/files/([A-Za-z0-9_-]{{1,1400}})$")
DELIMITER = "/"


def invalid_path(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field_path} is not a valid workspace path: {description}",
        reason="INVALID_PATH",
        violations=[FieldViolation(field_path, description)],
    )


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid workspace path, or None."""
    if not path:
        return "is required"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"must be at most {MAX_PATH_BYTES} bytes of UTF-8"
    if _CONTROL.search(path):
        return "must not contain NUL or other control characters"
    if any(unicodedata.category(c) in _INVISIBLE for c in path):
        return "must not contain Unicode format characters or line/paragraph separators"
    if "\\" in path:
        return "must not contain a backslash"
    if not unicodedata.is_normalized("NFC", path):
        return "must be in Unicode normalization form C"
    if path.startswith("/"):
        return "must be relative to the workspace (no leading /)"
    for segment in path.split("/"):
        if segment == "":
            return "must not have empty segments (//) or a trailing /"
        if segment in {".", ".."}:
            return "must not have . or .. segments"
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            return f"segments must be at most {MAX_SEGMENT_BYTES} bytes"
    return None


def check_path(path: str, field_path: str) -> str:
    problem = path_problem(path)
    if problem is not None:
        raise invalid_path(field_path, problem)
    return path


def check_prefix(prefix: str, field_path: str) -> str:
    """A listing prefix: empty, a path, or a path followed by ``/`` (a directory)."""
    if prefix:
        check_path(prefix.removesuffix("/"), field_path)
    return prefix


def file_id(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")


def file_name(workspace_id: str, path: str) -> str:
    return f"workspaces/{workspace_id}/files/{file_id(path)}"


def parse_file_name(name: str, field_path: str) -> tuple[str, str]:
    """(workspace id, path) of a file's resource name, or INVALID_ARGUMENT."""
    match = _FILE_NAME.match(name)
    if match is None:
        raise InvalidArgument(
            f"{field_path} is not a file name",
            violations=[FieldViolation(field_path, "must be workspaces/{workspace}/files/{file}")],
        )
    workspace_id, encoded = match.groups()
    try:
        path = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise invalid_path(field_path, "{file} must be the base64url of a UTF-8 path") from exc
    if file_id(path) != encoded:  # one path, one name: no alternative encodings
        raise invalid_path(field_path, "{file} must be the base64url of the path, unpadded")
    return workspace_id, check_path(path, field_path)
