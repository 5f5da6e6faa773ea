"""The offline model itself: from a Messages API request body to the reply it gets.

Pure and deterministic: no I/O, no clock, no state between requests. The reply is computed from
the request body alone, so the same conversation always gets the same answer, across retries,
resumed sessions, subagents and parallel tests.

A prompt scripts the model with a directive anywhere in the user's message text::

    <<corral-model [{"tool": "Bash", "input": {"command": "echo hi"}}, {"text": "done"}]>>

The JSON (read with ``json.JSONDecoder.raw_decode``, so it may contain ``>>`` or ``]]``) is a
list of steps, or one step. Steps:

- ``{"text": "...", "chunk": 8, "delay": 0.05}``: a text block, streamed in deltas of ``chunk``
  characters (default 32), sleeping ``delay`` seconds before each delta after the first.
- ``{"thinking": "...", "chunk": 8, "delay": 0.05}``: a thinking block, then its signature.
- ``{"tool": "Bash", "input": {...}, "id": "toolu_..."}``: a tool_use block (any name, MCP
  tools included: ``mcp__<server>__<tool>``); ``id`` is optional and derived when absent.
- ``{"delay": 0.5}``: sleep at this point of the reply (before the first event, it delays the
  response headers, like a slow model).
- ``{"usage": {"input_tokens": N, "output_tokens": M}}``: the usage this reply reports (also
  ``cache_creation_input_tokens`` and ``cache_read_input_tokens``); by default both are
  estimated at four characters per token.
- ``{"error": {"status": 429, "type": "rate_limit_error", "message": "..."}}``: fail. Placed
  before any content the request fails with that HTTP status (the only way to get a status
  other than 400); placed after some content the stream carries an ``error`` event instead.
  ``"retry": false`` (or ``true``) adds ``x-should-retry``, which the CLI obeys even for 5xx.

The script spans the whole turn. A reply ends after a run of tool steps (several in a row are
parallel tool calls, stop_reason ``tool_use``); the steps after it make the next reply, played
once the tool results come back (counted as tool_result blocks after the scripted message). A
reply without tool steps ends the turn (``end_turn``). Once the script is used up, tool results
are answered with a short summary of them; a message without a directive gets an echo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DIRECTIVE = "<<corral-model"
DIRECTIVE_END = ">>"
DEFAULT_CHUNK = 32
SUMMARY_CHARS = 200
ECHO_CHARS = 500
USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
_STEP_KINDS = ("text", "thinking", "tool", "usage", "error", "delay")
_REMINDER = "<system-reminder>"
_INTERRUPTED = "[Request interrupted by user"
_REMINDERS = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)


class RequestError(ValueError):
    """The request (or the script in it) cannot be answered: reported as a 400."""


@dataclass(frozen=True)
class Block:
    """One content block of the reply, with the pieces it is streamed in."""

    kind: Literal["text", "thinking", "tool_use"]
    pieces: tuple[str, ...]
    delay: float = 0.0
    tool_name: str = ""
    tool_id: str = ""
    tool_input: Mapping[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    def signature(self) -> str:
        digest = hashlib.sha256(self.content.encode()).digest()
        return base64.b64encode(b"corral-offline:" + digest).decode()

    def as_json(self) -> dict[str, Any]:
        """The block as a non-streaming reply carries it."""
        if self.kind == "text":
            return {"type": "text", "text": self.content}
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": self.content, "signature": self.signature()}
        return {
            "type": "tool_use",
            "id": self.tool_id,
            "name": self.tool_name,
            "input": dict(self.tool_input),
        }


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Failure:
    status: int
    type: str
    message: str
    retry: bool | None = None


Action = Block | Pause | Failure


@dataclass(frozen=True)
class Reply:
    """Everything one response carries, in the order it is produced."""

    message_id: str
    model: str
    stream: bool
    actions: tuple[Action, ...]
    stop_reason: Literal["end_turn", "tool_use"]
    usage: Mapping[str, int]


def plan_reply(raw: bytes) -> Reply:
    """The reply to a Messages API request body; raises RequestError for a bad request or script."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: a non-empty string is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list is required")
    if not all(isinstance(message, dict) for message in messages):
        raise RequestError("messages: every entry must be an object")

    prompt_at, prompt_texts = _prompt(messages)
    results = [block for m in messages[prompt_at + 1 :] for block in _tool_results(m)]
    script = _find_directive(prompt_texts)
    steps = [] if script is None else _current_round(script, len(results))

    usage = {k: v for step in steps if "usage" in step for k, v in step["usage"].items()}
    salt = len(messages)  # tool ids stay unique when a conversation repeats a directive
    actions = [_action(step, f"{salt}:{n}") for n, step in enumerate(steps) if "usage" not in step]
    if not any(isinstance(a, Block | Failure) for a in actions):
        if results:
            text = _summarise(messages, results)
        else:
            echo = " ".join(t.strip() for t in prompt_texts if t.strip())
            text = "You said: " + _clip(echo, ECHO_CHARS)
        actions.append(_text_block(text, DEFAULT_CHUNK, 0.0))

    blocks = [a for a in actions if isinstance(a, Block)]
    estimated = {
        "input_tokens": max(1, math.ceil(len(raw) / 4)),
        "output_tokens": max(1, sum(math.ceil(len(b.content) / 4) for b in blocks)),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    return Reply(
        message_id=f"msg_offline_{hashlib.sha256(raw).hexdigest()[:24]}",
        model=model,
        stream=body.get("stream") is True,
        actions=tuple(actions),
        stop_reason="tool_use" if any(b.kind == "tool_use" for b in blocks) else "end_turn",
        usage=estimated | usage,
    )


def _content_blocks(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _user_texts(message: Mapping[str, Any]) -> list[str]:
    """The text a person wrote in a user message, without the CLI's system reminders."""
    if message.get("role") != "user":
        return []
    return [
        block["text"]
        for block in _content_blocks(message)
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
        and not block["text"].lstrip().startswith(_REMINDER)
    ]


def _tool_results(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    if message.get("role") != "user":
        return []
    return [
        block
        for block in _content_blocks(message)
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


def _prompt(messages: Sequence[Mapping[str, Any]]) -> tuple[int, list[str]]:
    """The last user message with text of its own (not only tool results and reminders)."""
    for index in range(len(messages) - 1, -1, -1):
        texts = _user_texts(messages[index])
        interrupts = [i for i, text in enumerate(texts) if text.startswith(_INTERRUPTED)]
        if interrupts and interrupts[-1] + 1 < len(texts):
            # The CLI merges "[Request interrupted by user]" and the next prompt into one message.
            texts = texts[interrupts[-1] + 1 :]
        if texts:
            return index, texts
    raise RequestError("messages: no user message with text to answer")


def _find_directive(texts: Sequence[str]) -> list[dict[str, Any]] | None:
    for text in texts:
        start = text.find(DIRECTIVE)
        if start < 0:
            continue
        at = start + len(DIRECTIVE)
        at += len(text[at:]) - len(text[at:].lstrip())
        try:
            script, end = json.JSONDecoder().raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise RequestError(f"corral-model directive: invalid JSON ({exc})") from exc
        end += len(text[end:]) - len(text[end:].lstrip())
        if not text.startswith(DIRECTIVE_END, end):
            raise RequestError(f"corral-model directive: expected {DIRECTIVE_END!r} after the JSON")
        steps = script if isinstance(script, list) else [script]
        for number, step in enumerate(steps, 1):
            _validate(step, number)
        return steps
    return None


def _validate(step: object, number: int) -> None:
    where = f"corral-model directive, step {number}"
    if not isinstance(step, dict):
        raise RequestError(f"{where}: a step must be an object")
    kinds = [k for k in _STEP_KINDS if k in step]
    if kinds[:1] in (["text"], ["thinking"]) and kinds[1:] == ["delay"]:
        kinds = kinds[:1]  # "delay" paces the deltas of a text or thinking step
    if len(kinds) != 1:
        raise RequestError(f"{where}: needs exactly one of {', '.join(_STEP_KINDS)}")
    kind = kinds[0]
    value = step[kind]
    allowed = {"text": {"chunk", "delay"}, "thinking": {"chunk", "delay"}, "tool": {"input", "id"}}
    unknown = set(step) - {kind} - allowed.get(kind, set())
    if unknown:
        raise RequestError(f"{where}: unknown keys {sorted(unknown)}")
    if kind == "error" and isinstance(value, dict):
        unknown = set(value) - {"status", "type", "message", "retry"}
        if unknown:
            raise RequestError(f"{where}: unknown error keys {sorted(unknown)}")
    if kind in ("text", "thinking"):
        if not isinstance(value, str):
            raise RequestError(f"{where}: {kind} must be a string")
        chunk = step.get("chunk", DEFAULT_CHUNK)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise RequestError(f"{where}: chunk must be a positive integer")
        _seconds(step.get("delay", 0), where)
    elif kind == "tool":
        if not isinstance(value, str) or not value:
            raise RequestError(f"{where}: tool must be a tool name")
        if not isinstance(step.get("input", {}), dict):
            raise RequestError(f"{where}: input must be an object")
        if not isinstance(step.get("id", ""), str):
            raise RequestError(f"{where}: id must be a string")
    elif kind == "delay":
        _seconds(value, where)
    elif kind == "usage":
        if not isinstance(value, dict) or not set(value) <= set(USAGE_KEYS):
            raise RequestError(f"{where}: usage takes only {', '.join(USAGE_KEYS)}")
        if not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value.values()
        ):
            raise RequestError(f"{where}: token counts must be non-negative integers")
    else:
        if not isinstance(value, dict):
            raise RequestError(f"{where}: error must be an object")
        status = value.get("status", 500)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise RequestError(f"{where}: error status must be an HTTP error status")
        if not all(isinstance(value.get(k, ""), str) for k in ("type", "message")):
            raise RequestError(f"{where}: error type and message must be strings")
        if not isinstance(value.get("retry", False), bool):
            raise RequestError(f"{where}: error retry must be true or false")


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 600:
        raise RequestError(f"{where}: delay must be between 0 and 600 seconds")
    return float(value)


def _rounds(steps: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a script into replies: each ends after a run of tool steps."""
    rounds: list[list[dict[str, Any]]] = [[]]
    for step in steps:
        current = rounds[-1]
        if "tool" not in step and any("tool" in s for s in current):
            rounds.append([])
        rounds[-1].append(step)
    return rounds


def _current_round(script: Sequence[dict[str, Any]], results: int) -> list[dict[str, Any]]:
    """The steps of the reply due now, judged by the tool results that came back (none once
    the script is used up)."""
    for steps in _rounds(script):
        tools = sum(1 for step in steps if "tool" in step)
        if tools == 0 or results < tools:
            return steps
        results -= tools
    return []


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _action(step: Mapping[str, Any], salt: str) -> Action:
    if "text" in step or "thinking" in step:
        kind: Literal["text", "thinking"] = "text" if "text" in step else "thinking"
        chunk = int(step.get("chunk", DEFAULT_CHUNK))
        delay = float(step.get("delay", 0))
        if kind == "text":
            return _text_block(step["text"], chunk, delay)
        return Block("thinking", _split(step["thinking"], chunk), delay)
    if "tool" in step:
        tool_input = step.get("input", {})
        encoded = json.dumps(tool_input, separators=(",", ":"))
        tool_id = (
            step.get("id")
            or "toolu_offline_"
            + hashlib.sha256(f"{salt}:{step['tool']}:{encoded}".encode()).hexdigest()[:24]
        )
        return Block(
            "tool_use",
            _split(encoded, DEFAULT_CHUNK),
            tool_name=step["tool"],
            tool_id=tool_id,
            tool_input=tool_input,
        )
    if "delay" in step:
        return Pause(float(step["delay"]))
    error = step["error"]
    status = int(error.get("status", 500))
    return Failure(
        status=status,
        type=error.get("type") or _ERROR_TYPES.get(status, "api_error"),
        message=error.get("message") or f"scripted error {status}",
        retry=error.get("retry"),
    )


def _text_block(text: str, chunk: int, delay: float) -> Block:
    return Block("text", _split(text, chunk), delay)


def _split(text: str, chunk: int) -> tuple[str, ...]:
    return tuple(text[i : i + chunk] for i in range(0, len(text), chunk)) or ("",)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _result_text(result: Mapping[str, Any]) -> str:
    content = result.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


def _summarise(messages: Sequence[Mapping[str, Any]], results: Sequence[dict[str, Any]]) -> str:
    """A short answer about the latest tool results (those of the last user message)."""
    names = {
        block.get("id"): block.get("name")
        for message in messages
        if message.get("role") == "assistant"
        for block in _content_blocks(message)
        if isinstance(block, dict) and block.get("type") == "tool_use"
    }
    latest = _tool_results(messages[-1]) or list(results[-1:])
    lines = []
    for result in latest:
        name = names.get(result.get("tool_use_id")) or "tool"
        outcome = "failed" if result.get("is_error") else "returned"
        text = _clip(_REMINDERS.sub("", _result_text(result)).strip(), SUMMARY_CHARS)
        lines.append(
            f"The {name} tool {outcome}: {text}" if text else f"The {name} tool {outcome}."
        )
    return "\n".join(lines)
