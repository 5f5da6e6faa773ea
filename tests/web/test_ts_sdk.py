"""The TypeScript SDK's own tests (libs/ts-sdk/test, ``node --test``) against the real stack,
through Envoy: log in, create a session, send a message, read the streamed answer, and resume
the stream by sequence after the connection is cut mid-turn; upload and download files (one
call and chunked, with chunk calls failing on the way and a download stream broken mid-file),
checked by SHA-256."""

from __future__ import annotations

from tests.web.conftest import SDK, Stack, node, run, service_workspace


async def test_the_typescript_sdk_through_envoy(stack: Stack) -> None:
    output = await run(
        node(),
        "--test",
        "--test-reporter=tap",
        "test/sdk.test.mjs",
        cwd=SDK,
        env={
            "CORRAL_URL": stack.edge_url,
            "CORRAL_EMAIL": stack.email,
            "CORRAL_PASSWORD": stack.password,
        },
    )
    assert "# pass 2" in output and "# skipped 0" in output and "# fail 0" in output, output


async def test_file_transfers_through_envoy(stack: Stack) -> None:
    output = await run(
        node(),
        "--test",
        "--test-reporter=tap",
        "test/storage.test.mjs",
        cwd=SDK,
        env={
            "CORRAL_URL": stack.edge_url,
            "CORRAL_EMAIL": stack.email,
            "CORRAL_PASSWORD": stack.password,
            "CORRAL_WORKSPACE": await service_workspace(stack),
        },
    )
    assert "# pass 4" in output and "# skipped 0" in output and "# fail 0" in output, output
