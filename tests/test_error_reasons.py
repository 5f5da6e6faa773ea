"""The error reasons the code sends are the ones the contract documents: every
``reason="..."`` a service raises is a value of its context's ErrorReason enum or of the
common one (corral.common.v1), and the shared kit only sends common reasons."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from corral.common.v1 import error_reason_pb2 as common

ROOT = Path(__file__).resolve().parent.parent
LITERAL = re.compile(r"""(?:reason|default_reason)\s*=\s*["']([A-Z][A-Z0-9_]+)["']""")
IMPLEMENTED = ("identity", "session", "runtime", "storage")


def _names(enum: EnumTypeWrapper) -> set[str]:
    return {value.name.removeprefix("ERROR_REASON_") for value in enum.DESCRIPTOR.values}


def _used(paths: list[Path]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in paths:
        for reason in LITERAL.findall(path.read_text()):
            found.setdefault(reason, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_kit_sends_only_common_reasons() -> None:
    used = _used(sorted((ROOT / "libs").rglob("*.py")))
    assert used, "the scan found nothing: the pattern is wrong"
    assert {r: p for r, p in used.items() if r not in _names(common.ErrorReason)} == {}


@pytest.mark.parametrize("context", IMPLEMENTED)
def test_each_service_sends_documented_reasons(context: str) -> None:
    module = __import__(f"corral.{context}.v1.error_reason_pb2", fromlist=["ErrorReason"])
    documented = _names(module.ErrorReason) | _names(common.ErrorReason)
    used = _used(sorted((ROOT / "services" / context).rglob("*.py")))
    assert used, "the scan found nothing: the pattern is wrong"
    assert {r: p for r, p in used.items() if r not in documented} == {}
