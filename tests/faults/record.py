"""Times to recovery: printed, kept for the run's summary, and written to
test-artifacts/faults.json (this run's scenarios, one entry each)."""

from __future__ import annotations

import json
import time
from pathlib import Path

ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "faults.json"
MEASURED: dict[str, dict[str, object]] = {}


def record(scenario: str, **measures: object) -> None:
    """Keep ``measures`` (seconds rounded to milliseconds) of ``scenario``."""
    entry = {k: round(v, 3) if isinstance(v, float) else v for k, v in measures.items()}
    entry["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    MEASURED.setdefault(scenario, {}).update(entry)
    print(f"[faults] {scenario}: {json.dumps(entry, sort_keys=True)}")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(MEASURED, indent=2, sort_keys=True) + "\n")
