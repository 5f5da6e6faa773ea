"""The Python package is Python only: it ships no TypeScript project files (the SDK, the
console, their node_modules); the edge and the console read protos/, deploy/ and the console's
dist/ from settings (CORRAL_PROTOS_DIR, CORRAL_ENVOY_TEMPLATE, CORRAL_CONSOLE_DIR)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_python_files_only(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheel"),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("corral-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = [n for n in names if not n.startswith("corral-")]
    assert any(n.startswith("corral/services/session/") for n in package)
    assert any(n.startswith("corral/services/identity/migrations/versions/") for n in package)
    others = [n for n in package if not n.endswith((".py", ".pyi")) and n != "corral/py.typed"]
    assert others == []
