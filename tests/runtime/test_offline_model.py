"""The offline model server: its HTTP protocol first, then the real SDK and bundled CLI on it.

The protocol tests speak raw HTTP/1.1 over asyncio streams, so they see exactly what the CLI
sees: status lines, headers, one chunk per server-sent event, keep-alive. The SDK tests run the
real ``claude-agent-sdk`` (one CLI process each, never more than one at a time) with its traffic
pointed at the server, and check what a user of Corral would see: text, files written by tools,
denied tools, usage, MCP tools, errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultError,
    ResultMessage,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolPermissionContext,
    ToolResultBlock,
    ToolUseBlock,
    create_sdk_mcp_server,
    query,
    tool,
)

from corral.services.runtime.offline_model import server, start

MODEL = "claude-sonnet-4-5"


def directive(*steps: dict[str, Any]) -> str:
    return f"<<corral-model {json.dumps(list(steps))}>>"


@pytest.fixture(scope="module")
async def port() -> AsyncIterator[int]:
    server, bound = await start("127.0.0.1", 0)
    yield bound
    server.close()
    await server.wait_closed()


# --- a raw HTTP/1.1 client -------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: dict[str, str], chunks: list[bytes]) -> None:
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.body = b"".join(chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The server-sent events, asserting that each arrived in a chunk of its own."""
        events = []
        for chunk in self.chunks:
            text = chunk.decode()
            assert text.endswith("\n\n")
            assert text.count("\n\n") == 1, "one chunk per event"
            name_line, data_line = text.strip().split("\n")
            assert name_line.startswith("event: ")
            assert data_line.startswith("data: ")
            data = json.loads(data_line.removeprefix("data: "))
            assert data["type"] == name_line.removeprefix("event: ")
            events.append((data["type"], data))
        return events


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def send_raw(self, data: bytes) -> Response:
        self.writer.write(data)
        await self.writer.drain()
        return await self.read_response()

    async def request(
        self, body: object, path: str = "/v1/messages?beta=true", method: str = "POST"
    ) -> Response:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: localhost\r\nx-api-key: offline\r\n"
            f"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        )
        return await self.send_raw(head.encode() + payload)

    async def read_response(self) -> Response:
        return await asyncio.wait_for(self._read_response(), 10)

    async def _read_response(self) -> Response:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        chunks = []
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                chunks.append(await self.reader.readexactly(size))
                assert await self.reader.readexactly(2) == b"\r\n"
            assert await self.reader.readexactly(2) == b"\r\n"
        else:
            chunks.append(await self.reader.readexactly(int(headers["content-length"])))
        return Response(status, headers, chunks)


async def post(port: int, body: object, **kwargs: Any) -> Response:
    connection = await Connection.open(port)
    try:
        return await connection.request(body, **kwargs)
    finally:
        await connection.close()


def request_body(*messages: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    """A request shaped like the CLI's: system blocks, reminders before the prompt, tools."""
    return {
        "model": MODEL,
        "max_tokens": 32000,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "metadata": {"user_id": "test"},
        "stream": stream,
        "messages": list(messages),
    }


def user(text: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>\nToday is a test.\n</system-reminder>"},
            {"type": "text", "text": text},
        ],
    }


def assert_error(response: Response, status: int, error_type: str, fragment: str = "") -> None:
    assert response.status == status
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == error_type
    assert fragment in payload["error"]["message"]


# --- the protocol ----------------------------------------------------------------------------


async def test_text_streams_as_ordered_events_one_chunk_each(port: int) -> None:
    text = "Streaming, four characters at a time."
    body = request_body(user("hi " + directive({"text": text, "chunk": 4})))

    response = await post(port, body)

    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.events()
    names = [name for name, _ in events]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * len(deltas),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0][1]["message"]
    assert message["model"] == MODEL
    assert message["role"] == "assistant"
    assert message["id"].startswith("msg_")
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert all(d["type"] == "text_delta" and len(d["text"]) <= 4 for d in deltas)
    assert "".join(d["text"] for d in deltas) == text
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] >= 1


async def test_thinking_and_parallel_tool_calls_end_with_tool_use(port: int) -> None:
    script = directive(
        {"thinking": "Two tools at once.", "chunk": 5},
        {"tool": "Bash", "input": {"command": "echo '>> ]]'"}},
        {"tool": "mcp__notes__add", "input": {"a": 2, "b": 3}},
    )

    events = (await post(port, request_body(user(script)))).events()

    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["thinking", "tool_use", "tool_use"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}
    for name, data in events:
        if name == "content_block_delta":
            by_index[data["index"]].append(data["delta"])
    thinking = [d["thinking"] for d in by_index[0] if d["type"] == "thinking_delta"]
    assert "".join(thinking) == "Two tools at once."
    assert by_index[0][-1]["type"] == "signature_delta"
    assert by_index[0][-1]["signature"]
    bash, add = starts[1]["content_block"], starts[2]["content_block"]
    assert (bash["name"], bash["input"]) == ("Bash", {})
    assert add["name"] == "mcp__notes__add"
    assert bash["id"].startswith("toolu_")
    assert bash["id"] != add["id"]
    for index, expected in ((1, {"command": "echo '>> ]]'"}), (2, {"a": 2, "b": 3})):
        assert all(d["type"] == "input_json_delta" for d in by_index[index])
        assert json.loads("".join(d["partial_json"] for d in by_index[index])) == expected
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def final_text(response: Response) -> str:
    if response.headers["content-type"].startswith("application/json"):
        return "".join(b["text"] for b in response.json()["content"] if b["type"] == "text")
    return "".join(
        data["delta"]["text"]
        for name, data in response.events()
        if name == "content_block_delta" and data["delta"]["type"] == "text_delta"
    )


async def test_script_advances_as_tool_results_come_back(port: int) -> None:
    prompt = user(directive({"tool": "Bash", "input": {"command": "ls"}}, {"text": "listed"}))
    first = (await post(port, request_body(prompt))).events()
    tool_use = next(d for n, d in first if n == "content_block_start")["content_block"]
    assistant = {
        "role": "assistant",
        "content": [{**tool_use, "input": {"command": "ls"}}],
    }
    result = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": tool_use["id"],
                "content": "a.txt\n<system-reminder>noise</system-reminder>",
            }
        ],
    }

    second = await post(port, request_body(prompt, assistant, result))
    assert final_text(second) == "listed"

    # Past the script's end, tool results get a short summary by default.
    one_step = user(directive({"tool": "Bash", "input": {"command": "ls"}}))
    after = await post(port, request_body(one_step, assistant, result))
    assert final_text(after) == "The Bash tool returned: a.txt"

    # A later message without a directive gets an echo, whatever came before.
    echoed = await post(
        port, request_body(prompt, assistant, result, {"role": "user", "content": "thanks!"})
    )
    assert final_text(echoed) == "You said: thanks!"


async def test_a_prompt_after_an_interrupt_is_answered_not_the_one_before(port: int) -> None:
    # The CLI merges the interrupted prompt, its marker and the next prompt into one message.
    merged = {
        "role": "user",
        "content": [
            {"type": "text", "text": directive({"text": "old script"})},
            {"type": "text", "text": "[Request interrupted by user]"},
            {"type": "text", "text": "new question"},
        ],
    }
    assert final_text(await post(port, request_body(merged))) == "You said: new question"


async def test_same_request_same_bytes(port: int) -> None:
    body = request_body(user("Determinism, please."))
    first, second = await post(port, body), await post(port, body)
    assert first.body == second.body
    assert final_text(first) == "You said: Determinism, please."


async def test_non_streaming_fallback_returns_one_message(port: int) -> None:
    script = directive(
        {"usage": {"input_tokens": 11, "output_tokens": 22}},
        {"thinking": "hm"},
        {"text": "whole"},
        {"tool": "Read", "input": {"file_path": "/etc/hostname"}},
    )

    response = await post(port, request_body(user(script), stream=False))

    assert response.status == 200
    message = response.json()
    assert message["type"] == "message"
    assert message["stop_reason"] == "tool_use"
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0]["signature"]
    assert message["content"][2]["input"] == {"file_path": "/etc/hostname"}
    assert message["usage"]["input_tokens"] == 11
    assert message["usage"]["output_tokens"] == 22


async def test_keep_alive_serves_several_requests_on_one_connection(port: int) -> None:
    connection = await Connection.open(port)
    try:
        first = await connection.request(request_body(user("one")))
        bad = await connection.request(b"{not json")
        second = await connection.request(request_body(user("two"), stream=False))
    finally:
        await connection.close()
    assert final_text(first) == "You said: one"
    assert_error(bad, 400, "invalid_request_error", "not JSON")
    assert final_text(second) == "You said: two"


async def test_chunked_request_bodies_and_token_counts(port: int) -> None:
    payload = json.dumps(request_body(user("count me"))).encode()
    half = len(payload) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        payload[:half],
        len(payload) - half,
        payload[half:],
    )
    connection = await Connection.open(port)
    try:
        head = b"POST /v1/messages/count_tokens HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        response = await connection.send_raw(head + chunked)
    finally:
        await connection.close()
    assert response.status == 200
    assert response.json() == {"input_tokens": -(-len(payload) // 4)}


@pytest.mark.parametrize(
    ("body", "path", "method", "fragment"),
    [
        (b"\x00\xff garbage", "/v1/messages", "POST", "not JSON"),
        (b"[]", "/v1/messages", "POST", "JSON object"),
        ({"model": MODEL, "messages": []}, "/v1/messages", "POST", "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "/v1/messages", "POST", "model"),
        (b"", "/v1/models", "GET", "GET /v1/models"),
        (b"{}", "/v1/complete", "POST", "/v1/complete"),
        (request_body(user("<<corral-model [{")), "/v1/messages", "POST", "invalid JSON"),
        (request_body(user("<<corral-model []")), "/v1/messages", "POST", "'>>'"),
        (request_body(user(directive({"txt": "typo"}))), "/v1/messages", "POST", "step 1"),
        (request_body(user(directive({"delay": -1}))), "/v1/messages", "POST", "delay"),
    ],
)
async def test_anything_else_is_a_400_never_a_5xx(
    port: int, body: object, path: str, method: str, fragment: str
) -> None:
    response = await post(port, body, path=path, method=method)
    assert_error(response, 400, "invalid_request_error", fragment)
    assert response.headers["x-should-retry"] == "false"


async def test_a_malformed_request_line_is_a_400(port: int) -> None:
    connection = await Connection.open(port)
    try:
        response = await connection.send_raw(b"HELLO\r\n\r\n")
    finally:
        await connection.close()
    assert_error(response, 400, "invalid_request_error", "request line")


async def test_the_servers_own_faults_are_400s_even_mid_stream(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_plan(raw: bytes) -> None:
        raise KeyError("planning")

    with monkeypatch.context() as patch:
        patch.setattr(server, "plan_reply", broken_plan)
        response = await post(port, request_body(user("hi")))
    assert_error(response, 400, "invalid_request_error", "offline model bug: KeyError('planning')")

    async def broken_block(*args: object) -> None:
        raise RuntimeError("streaming")

    with monkeypatch.context() as patch:
        patch.setattr(server, "_stream_block", broken_block)
        response = await post(port, request_body(user("hi")))
    assert response.status == 200
    names = [name for name, _ in response.events()]
    assert names == ["message_start", "ping", "error"]
    error = response.events()[-1][1]["error"]
    assert error["type"] == "invalid_request_error"
    assert "RuntimeError('streaming')" in error["message"]


async def test_scripted_errors_choose_their_status(port: int) -> None:
    limited = directive({"error": {"status": 429, "message": "slow down", "retry": False}})
    response = await post(port, request_body(user(limited)))
    assert_error(response, 429, "rate_limit_error", "slow down")
    assert response.headers["x-should-retry"] == "false"

    overloaded = directive({"error": {"status": 529, "type": "overloaded_error"}})
    response = await post(port, request_body(user(overloaded), stream=False))
    assert_error(response, 529, "overloaded_error")
    assert "x-should-retry" not in response.headers

    # After some content the status is already sent: the stream ends with an error event.
    midway = directive({"text": "partial"}, {"error": {"status": 500, "message": "lost it"}})
    events = (await post(port, request_body(user(midway)))).events()
    assert [n for n, _ in events][-2:] == ["content_block_stop", "error"]
    assert events[-1][1]["error"] == {"type": "api_error", "message": "lost it"}


async def test_delays_hold_back_the_stream(port: int) -> None:
    script = directive({"delay": 0.2}, {"text": "abc", "chunk": 1, "delay": 0.1})
    began = time.monotonic()
    connection = await Connection.open(port)
    try:
        payload = json.dumps(request_body(user(script))).encode()
        connection.writer.write(
            b"POST /v1/messages HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
        headers_at = time.monotonic() - began
        await asyncio.wait_for(connection.reader.readuntil(b"message_stop"), 10)
        done_at = time.monotonic() - began
    finally:
        await connection.close()
    assert headers_at >= 0.2
    assert done_at - headers_at >= 0.2


async def test_command_line_prints_its_port(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.services.runtime.offline_model",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        response = await post(int(line.rsplit(":", 1)[1]), request_body(user("cli")))
        assert final_text(response) == "You said: cli"
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


# --- the real SDK and bundled CLI ------------------------------------------------------------


def sdk_options(tmp_path: Path, port: int, **overrides: Any) -> ClaudeAgentOptions:
    home = tmp_path / "home"
    cwd = tmp_path / "work"
    home.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "env": {
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
            "ANTHROPIC_API_KEY": "offline",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "HOME": str(home),
            "CLAUDE_CODE_MAX_RETRIES": "0",
        },
        "model": MODEL,
        "cwd": cwd,
        "include_partial_messages": True,
    }
    settings.update(overrides)
    return ClaudeAgentOptions(**settings)


async def run(prompt: str, options: ClaudeAgentOptions) -> list[Message]:
    return [message async for message in query(prompt=prompt, options=options)]


def blocks_of(messages: list[Message], kind: type[Any]) -> list[Any]:
    return [
        block
        for message in messages
        if hasattr(message, "content") and isinstance(message.content, list)
        for block in message.content
        if isinstance(block, kind)
    ]


def result_of(messages: list[Message]) -> ResultMessage:
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1
    return results[0]


async def test_sdk_streams_a_plain_answer(tmp_path: Path, port: int) -> None:
    text = "Hello from the offline model."
    messages = await run(
        "Say hello. " + directive({"text": text, "chunk": 6}), sdk_options(tmp_path, port)
    )

    partial = [
        m.event["delta"]["text"]
        for m in messages
        if isinstance(m, StreamEvent)
        and m.event["type"] == "content_block_delta"
        and m.event["delta"]["type"] == "text_delta"
    ]
    assert partial == [text[i : i + 6] for i in range(0, len(text), 6)]
    assert [b.text for b in blocks_of(messages, TextBlock)] == [text]
    result = result_of(messages)
    assert result.subtype == "success"
    assert not result.is_error
    assert result.result == text


async def test_sdk_runs_a_scripted_bash_tool_in_its_working_directory(
    tmp_path: Path, port: int
) -> None:
    script = directive(
        {"tool": "Bash", "input": {"command": "echo hi > out.txt", "description": "write"}},
        {"text": "Wrote out.txt."},
    )

    messages = await run(script, sdk_options(tmp_path, port, allowed_tools=["Bash"]))

    assert (tmp_path / "work" / "out.txt").read_text() == "hi\n"
    [use] = blocks_of(messages, ToolUseBlock)
    [tool_result] = blocks_of(messages, ToolResultBlock)
    assert use.name == "Bash"
    assert tool_result.tool_use_id == use.id
    assert not tool_result.is_error
    result = result_of(messages)
    assert result.subtype == "success"
    assert result.result == "Wrote out.txt."
    assert result.num_turns == 2


async def test_sdk_tool_denied_by_can_use_tool_gets_an_error_result(
    tmp_path: Path, port: int
) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    async def deny(
        name: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResultAllow | PermissionResultDeny:
        asked.append((name, tool_input))
        return PermissionResultDeny(message="not in this test")

    script = directive({"tool": "Bash", "input": {"command": "echo hi > denied.txt"}})
    messages = await run(script, sdk_options(tmp_path, port, can_use_tool=deny))

    assert asked == [("Bash", {"command": "echo hi > denied.txt"})]
    assert not (tmp_path / "work" / "denied.txt").exists()
    [tool_result] = blocks_of(messages, ToolResultBlock)
    assert tool_result.is_error
    assert "not in this test" in str(tool_result.content)
    result = result_of(messages)
    assert result.subtype == "success"
    assert result.result is not None
    assert result.result.startswith("The Bash tool failed: ")
    assert "not in this test" in result.result
    assert [denial["tool_name"] for denial in result.permission_denials or []] == ["Bash"]


async def test_sdk_reports_the_scripted_usage(tmp_path: Path, port: int) -> None:
    script = directive(
        {"usage": {"input_tokens": 1234, "output_tokens": 567}}, {"text": "Counted."}
    )

    result = result_of(await run(script, sdk_options(tmp_path, port)))

    assert result.usage is not None
    assert result.usage["input_tokens"] == 1234
    assert result.usage["output_tokens"] == 567
    assert result.total_cost_usd == pytest.approx((1234 * 3 + 567 * 15) / 1e6)


async def test_sdk_calls_an_in_process_mcp_tool(tmp_path: Path, port: int) -> None:
    calls: list[dict[str, Any]] = []

    @tool("add", "Add two integers", {"a": int, "b": int})
    async def add(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(args)
        return {"content": [{"type": "text", "text": str(args["a"] + args["b"])}]}

    calc = create_sdk_mcp_server("calc", tools=[add])
    script = directive({"tool": "mcp__calc__add", "input": {"a": 2, "b": 3}})
    options = sdk_options(
        tmp_path, port, mcp_servers={"calc": calc}, allowed_tools=["mcp__calc__add"]
    )

    messages = await run(script, options)

    assert calls == [{"a": 2, "b": 3}]
    [tool_result] = blocks_of(messages, ToolResultBlock)
    assert not tool_result.is_error
    assert result_of(messages).result == "The mcp__calc__add tool returned: 5"


async def test_sdk_client_thinks_answers_again_and_survives_an_interrupt(
    tmp_path: Path, port: int
) -> None:
    async with ClaudeSDKClient(sdk_options(tmp_path, port)) as client:
        await client.query(directive({"thinking": "Let me see."}, {"text": "Seen."}))
        first = [m async for m in client.receive_response()]
        await client.query("And now?")
        second = [m async for m in client.receive_response()]

        await client.query(directive({"text": "a" * 100, "chunk": 1, "delay": 0.05}))
        interrupted: list[Message] = []
        deltas = 0
        async for message in client.receive_response():
            interrupted.append(message)
            if isinstance(message, StreamEvent) and message.event["type"] == "content_block_delta":
                deltas += 1
                if deltas == 3:
                    await client.interrupt()
        await client.query("Still there?")
        after = [m async for m in client.receive_response()]

    assert [b.thinking for b in blocks_of(first, ThinkingBlock)] == ["Let me see."]
    assert result_of(first).result == "Seen."
    assert result_of(second).result == "You said: And now?"
    assert deltas < 100
    assert result_of(interrupted).subtype == "error_during_execution"
    assert result_of(after).result == "You said: Still there?"


async def test_sdk_surfaces_a_scripted_server_error(tmp_path: Path, port: int) -> None:
    script = directive({"error": {"status": 500, "message": "scripted outage"}})
    messages: list[Message] = []
    with pytest.raises(ResultError, match="scripted outage"):
        async for message in query(prompt=script, options=sdk_options(tmp_path, port)):
            messages.append(message)

    errors = [m for m in messages if isinstance(m, AssistantMessage) and m.error]
    assert errors
    result = result_of(messages)
    assert result.is_error
    assert result.api_error_status == 500
