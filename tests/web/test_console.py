"""The web console end to end in a real browser: headless Debian Chromium, driven by
playwright-core from libs/web-console/e2e/console.e2e.mjs, against the real stack (five
services, Envoy, the console's static server, the offline model).

The script signs in (a wrong password first), creates a session that asks before tools, sees an
answer stream in piece by piece, approves one Bash call (it runs, its result shows) and denies
another, interrupts a turn, goes offline mid-answer (DevTools network emulation) and back, and
checks that what the page rendered is the session's history exactly once; it ends with usage
and a reload. Screenshots of every step land in test-artifacts/web/.
"""

from __future__ import annotations

from tests.web.conftest import ARTIFACTS, CONSOLE, Stack, node, run


async def test_the_console_in_chromium(chromium: str, stack: Stack) -> None:
    output = await run(
        node(),
        "e2e/console.e2e.mjs",
        cwd=CONSOLE,
        env={
            "CONSOLE_URL": stack.console_url,
            "EDGE_URL": stack.edge_url,
            "CORRAL_EMAIL": stack.email,
            "CORRAL_PASSWORD": stack.password,
            "ARTIFACTS": str(ARTIFACTS),
            "CHROMIUM": chromium,
        },
        limit=180,
    )
    assert "e2e passed" in output, output
    shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    assert len(shots) >= 12 and not any("failed" in s for s in shots), shots
    print(output)
