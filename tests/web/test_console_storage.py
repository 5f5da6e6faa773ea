"""The web console's files panel and reports page in a real browser: headless Debian Chromium,
driven by playwright-core from libs/web-console/e2e/storage.e2e.mjs, against the real stack
(five services, Envoy, the console's static server, the offline model).

Reports of each kind are filed through the API; the page lists and filters them, renders
Markdown sanitised, pretty-prints JSON, and shows HTML only in a sandboxed frame whose scripts
never run (checked against the same document, whose scripts do run in a page of its own). A
session's files panel uploads a small file (one call) and a big one (chunked, with progress);
the agent, scripted, reads both in a Bash call and writes files of its own; the panel shows
its directory when the turn ends, and what the agent wrote downloads byte for byte. Then the
attacker's view: a viewer of the organisation sees the files and may download them but is
refused an upload (PERMISSION_DENIED, shown on the transfer); another user sees neither the
session nor the reports, and a report opened by its name is NOT_FOUND. Screenshots of every
step land in test-artifacts/web/storage/.
"""

from __future__ import annotations

from tests.web.conftest import ARTIFACTS, CONSOLE, Stack, node, run

SHOTS = ARTIFACTS / "storage"


async def test_files_and_reports_in_chromium(chromium: str, stack: Stack) -> None:
    output = await run(
        node(),
        "e2e/storage.e2e.mjs",
        cwd=CONSOLE,
        env={
            "CONSOLE_URL": stack.console_url,
            "EDGE_URL": stack.edge_url,
            "CORRAL_EMAIL": stack.email,
            "CORRAL_PASSWORD": stack.password,
            "ARTIFACTS": str(SHOTS),
            "CHROMIUM": chromium,
        },
        limit=180,
    )
    assert "e2e passed" in output, output
    shots = sorted(p.name for p in SHOTS.glob("*.png"))
    assert len(shots) >= 9 and not any("failed" in s for s in shots), shots
    print(output)
