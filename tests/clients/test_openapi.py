"""The committed OpenAPI documents (openapi/, generated from the protos' HTTP rules) describe
the REST surface the edge really serves: every RPC with an HTTP rule has its operation, and
calls built only from the documents (path templates, parameters, bodies, the bearer scheme)
work against the real edge, with responses whose fields the documents name."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from corral.identity.v1 import identity_service_pb2
from corral.session.v1 import session_service_pb2
from tests.clients.edge_platform import Edged
from tests.support.platform import directive

ROOT = Path(__file__).resolve().parents[2]
DOCS = {
    c: json.loads((ROOT / f"openapi/corral/{c}/v1/{c}_service.swagger.json").read_text())
    for c in ("identity", "session", "task", "storage")
}


def operation(context: str, operation_id: str) -> tuple[str, str, dict[str, Any]]:
    for path, methods in DOCS[context]["paths"].items():
        for method, op in methods.items():
            if op["operationId"] == operation_id:
                return method.upper(), path, op
    raise AssertionError(f"{operation_id} is not in the {context} document")


def schema(context: str, ref: dict[str, Any]) -> dict[str, Any]:
    name = ref["$ref"].removeprefix("#/definitions/")
    return dict(DOCS[context]["definitions"][name])


def check_fields(context: str, value: Any, described: dict[str, Any]) -> None:
    """Every field of the response is one the document describes (recursively)."""
    if "$ref" in described:
        described = schema(context, described)
    if isinstance(value, dict) and "properties" in described:
        unknown = set(value) - set(described["properties"])
        if "additionalProperties" not in described:  # an Any: its type's fields alongside
            assert not unknown, f"undocumented fields {unknown}"
        for key, item in value.items():
            if key in described["properties"]:
                check_fields(context, item, described["properties"][key])
    elif isinstance(value, list) and "items" in described:
        for item in value:
            check_fields(context, item, described["items"])


def call(
    edged: Edged,
    context: str,
    operation_id: str,
    *,
    path: dict[str, str] | None = None,
    query: dict[str, Any] | None = None,
    body: Any = None,
    token: str = "",
) -> tuple[int, Any]:
    """A request built from the document alone; returns (status, parsed JSON body)."""
    method, template, op = operation(context, operation_id)
    values = path or {}

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]  # resource names go in whole: sessions/abc

    url = re.sub(r"\{([a-z_.]+)(?:=[^}]*)?\}", fill, template)
    documented = {p["name"]: p for p in op.get("parameters", [])}
    for name in query or {}:
        assert documented[name]["in"] == "query", name
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"content-type": "application/json"}
    if op.get("security", DOCS[context]["security"]):
        headers["authorization"] = f"Bearer {token}"
    if body is not None:
        assert documented["body"]["in"] == "body"
    connection = http.client.HTTPConnection(edged.target, timeout=30)
    try:
        connection.request(
            method, url, body=None if body is None else json.dumps(body), headers=headers
        )
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    answer = [json.loads(line) for line in raw.splitlines() if line.strip()]
    parsed = answer[0] if len(answer) == 1 and not op.get("x-corral-stream") else answer
    if response.status == 200:
        for item in parsed if op.get("x-corral-stream") else [parsed]:
            check_fields(context, item, op["responses"]["200"]["schema"])
    else:
        check_fields(context, parsed, op["responses"]["default"]["schema"])
    return response.status, parsed


def test_every_http_rule_is_documented() -> None:
    for context, module in (("identity", identity_service_pb2), ("session", session_service_pb2)):
        (service,) = module.DESCRIPTOR.services_by_name.values()
        documented = {
            # an additional binding of a method is numbered: GetQuota, GetQuota2
            re.sub(r"\d+$", "", op["operationId"])
            for path in DOCS[context]["paths"].values()
            for op in path.values()
        }
        assert {m.name for m in service.methods} == documented


@pytest.mark.parametrize("context", ["identity", "session", "task", "storage"])
def test_documents_are_complete_for_callers(context: str) -> None:
    document = DOCS[context]
    assert document["securityDefinitions"]["bearer"]["in"] == "header"
    for path in document["paths"].values():
        for op in path.values():
            assert op["responses"]["default"]["schema"] == {"$ref": "#/definitions/googlerpcStatus"}
    # Field names are the JSON names the transcoder prints, not the proto names.
    assert all(
        "_" not in name
        for d in document["definitions"].values()
        for name in d.get("properties", {})
    )


async def test_rest_calls_as_the_documents_describe_them(edged: Edged) -> None:
    email, password = edged.admin
    status, login = await asyncio.to_thread(
        call, edged, "identity", "Login", body={"email": email, "password": password}
    )
    assert status == 200, login
    assert "password" not in login["user"]  # input-only: never in a response
    token = login["token"]["accessToken"]

    status, created = await asyncio.to_thread(
        call,
        edged,
        "session",
        "CreateSession",
        body={"displayName": "from the document"},
        token=token,
    )
    assert status == 200, created
    name = created["session"]["name"]

    status, got = await asyncio.to_thread(
        call, edged, "session", "GetSession", path={"name": name}, token=token
    )
    assert (status, got["session"]["displayName"]) == (200, "from the document")

    status, listed = await asyncio.to_thread(
        call, edged, "session", "ListSessions", query={"page_size": 5}, token=token
    )
    assert status == 200 and name in [s["name"] for s in listed["sessions"]]

    text = directive({"text": "Documented.", "chunk": 4})
    status, sent = await asyncio.to_thread(
        call,
        edged,
        "session",
        "SendMessage",
        path={"session": name},
        body={"text": text},
        token=token,
    )
    assert status == 200, sent
    assert sent["turn"]["name"].startswith(name + "/turns/")
    async with asyncio.timeout(60):  # until the turn's result is in the history
        while True:
            status, page = await asyncio.to_thread(
                call, edged, "session", "ListSessionEvents", path={"parent": name}, token=token
            )
            assert status == 200, page
            history = page.get("sessionEvents", [])
            if any("turnResult" in e for e in history):
                break
            await asyncio.sleep(0.1)
    assert [e["sequence"] for e in history][:2] == ["1", "2"]  # int64: strings
    text_out = "".join(e["textDelta"]["text"] for e in history if "textDelta" in e)
    assert text_out == "Documented."

    # Errors are the documented google.rpc.Status, from a service and from the edge alike.
    status, missing = await asyncio.to_thread(
        call, edged, "session", "GetSession", path={"name": "sessions/nope"}, token=token
    )
    assert status == 404 and missing["details"][0]["reason"]
    status, refused = await asyncio.to_thread(
        call, edged, "session", "GetSession", path={"name": name}, token="not-a-token"
    )
    assert status == 401 and refused["details"][0]["reason"] == "TOKEN_INVALID"
