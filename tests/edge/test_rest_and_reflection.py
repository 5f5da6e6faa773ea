"""What callers of the edge see beyond routing: server reflection through :8080 (both protocol
versions, behind the token check, listing the whole public API), Envoy's own refusals in the
API's error model (a google.rpc.Status JSON body for REST, a details trailer for gRPC), a request
id on every response, unknown query parameters refused, and no empty input-only fields echoed."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from corral.libs.grpc.reflection import PUBLIC_API
from tests.edge.conftest import LOGIN, Edge, Seen
from tests.support.grpc_tools import error_reason, reflected_services
from tests.support.keys import SigningKey

REFLECTION = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}
LIST = "/corral.session.v1.SessionService/ListSessions"


async def reflect(
    target: str, version: str, request: reflection_pb2.ServerReflectionRequest, token: str | None
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection exchange; the two versions are wire-identical, so v1alpha's messages
    serve for both. (The blocking client: when a refusal ends the call before the request is
    written, grpc.aio reports the failed write instead of the status.)"""
    metadata = [("authorization", f"Bearer {token}")] if token else []

    def exchange() -> list[reflection_pb2.ServerReflectionResponse]:
        with grpc.insecure_channel(target) as channel:
            call = channel.stream_stream(
                REFLECTION[version],
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            return list(call(iter([request]), metadata=metadata, timeout=5))

    (reply,) = await asyncio.to_thread(exchange)
    return reply


def listing() -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(list_services="")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_through_the_edge_lists_the_public_api(
    edge: Edge, signing_key: SigningKey, version: str
) -> None:
    reply = await reflect(edge.target, version, listing(), signing_key.token())
    names = {s.name for s in reply.list_services_response.service}
    assert set(PUBLIC_API) <= names
    assert "grpc.health.v1.Health" in names
    assert not any(name.startswith("corral.runtime.") for name in names)  # internal

    # A symbol of another upstream's service resolves too: tools can call anything routed.
    symbol = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="corral.identity.v1.IdentityService"
    )
    reply = await reflect(edge.target, version, symbol, signing_key.token())
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    assert reply.file_descriptor_response.file_descriptor_proto

    # Every listed service resolves, v1 reflection's own included (a copy of v1alpha's file).
    for name in names:
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        reply = await reflect(edge.target, version, request, signing_key.token())
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        (found,) = [s for f in files for s in f.service if f"{f.package}.{s.name}" == name]
        package = name.rsplit(".", 1)[0]
        assert all(m.input_type.startswith(f".{package}.") for m in found.method), found


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_through_the_edge_needs_a_token(
    edge: Edge, seen: list[Seen], version: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await reflect(edge.target, version, listing(), None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "TOKEN_MISSING"  # the edge's details trailer
    assert not seen


async def test_a_service_port_lists_only_its_own_services(edge: Edge) -> None:
    """Directly (no edge header), reflection tells the truth about that one server."""
    names = await reflected_services(edge.servers["session-a"].address)
    assert [n for n in names if n.startswith("corral.")] == ["corral.session.v1.SessionService"]
    reply = await reflect(edge.servers["identity"].address, "v1", listing(), None)
    own = {s.name for s in reply.list_services_response.service}
    assert "corral.identity.v1.IdentityService" in own
    assert "corral.session.v1.SessionService" not in own


def rest(
    edge: Edge, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection(edge.target, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        headers_out = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers_out, json.loads(raw) if raw else None
    finally:
        connection.close()


def reason_of(body: dict[str, Any]) -> str:
    (info,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["domain"] == "corral.dev"
    return str(info["reason"])


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "TOKEN_MISSING"),
        ({"authorization": "Bearer not-a-jwt"}, "TOKEN_INVALID"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "TOKEN_MALFORMED"),
    ],
    ids=["missing", "garbage", "wrong-scheme"],
)
async def test_rest_refusals_are_google_rpc_status_json(
    edge: Edge, seen: list[Seen], headers: dict[str, str], reason: str
) -> None:
    status, out, body = await asyncio.to_thread(rest, edge, "GET", "/v1/sessions", headers)
    assert status == 401
    assert out["content-type"] == "application/json"
    assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert body["message"]
    assert reason_of(body) == reason
    assert out["x-request-id"]
    assert not seen


async def test_unknown_route_is_a_json_not_found(edge: Edge, signing_key: SigningKey) -> None:
    auth = {"authorization": f"Bearer {signing_key.token()}"}
    status, out, body = await asyncio.to_thread(rest, edge, "GET", "/v1/nowhere", auth)
    assert status == 404
    assert body["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert reason_of(body) == "NOT_FOUND"
    assert "/v1/nowhere" in body["message"]
    assert out["x-request-id"]


async def test_every_response_carries_a_request_id(edge: Edge, signing_key: SigningKey) -> None:
    auth = {"authorization": f"Bearer {signing_key.token()}"}
    status, out, _ = await asyncio.to_thread(rest, edge, "GET", "/v1/sessions", auth)
    assert status == 200 and out["x-request-id"]
    # A client's own id is kept, so logs on both sides correlate.
    mine = {**auth, "x-request-id": "req-from-the-client-1"}
    status, out, _ = await asyncio.to_thread(rest, edge, "GET", "/v1/sessions", mine)
    assert status == 200 and out["x-request-id"] == "req-from-the-client-1"
    # Upstream errors (transcoded) and public calls too.
    status, out, body = await asyncio.to_thread(rest, edge, "POST", "/v1/auth:login", {}, {})
    assert status == 404 and reason_of(body) == "TEST_ANSWER" and out["x-request-id"]
    # gRPC: a response header.
    async with grpc.aio.insecure_channel(edge.target) as channel:
        call = channel.unary_unary(LIST)(b"", metadata=[*auth.items()], timeout=5)
        await call
        assert dict(await call.initial_metadata())["x-request-id"]


async def test_unknown_query_parameters_are_refused(edge: Edge, signing_key: SigningKey) -> None:
    auth = {"authorization": f"Bearer {signing_key.token()}"}
    status, _, body = await asyncio.to_thread(rest, edge, "GET", "/v1/sessions?pageSize=2", auth)
    assert status == 200, body
    status, _, body = await asyncio.to_thread(
        rest, edge, "GET", "/v1/sessions?pageSize=2&colour=blue", auth
    )
    assert status == 400, body
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reason_of(body) == "INVALID_ARGUMENT"
    assert "colour" in body["message"]


async def test_unknown_body_fields_are_dropped_as_documented(edge: Edge, seen: list[Seen]) -> None:
    """Envoy's transcoder drops JSON fields the message does not have (proto3 JSON's forward
    compatibility; it has no switch to refuse them): the call reaches the service. The README
    says so under "Over REST/JSON"."""
    body = {"email": "a@corral.test", "password": "x", "rememberMe": True}
    status, _, answer = await asyncio.to_thread(rest, edge, "POST", "/v1/auth:login", {}, body)
    assert status == 404 and reason_of(answer) == "TEST_ANSWER"  # identity answered
    assert [s.method for s in seen] == [LOGIN]


async def test_grpc_refusals_carry_an_error_info(edge: Edge, signing_key: SigningKey) -> None:
    async with grpc.aio.insecure_channel(edge.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await channel.unary_unary(LIST)(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await channel.unary_unary(LIST)(
                b"", metadata=[("authorization", "Bearer x.y.z")], timeout=5
            )
        with pytest.raises(grpc.aio.AioRpcError) as unrouted:
            await channel.unary_unary("/corral.runtime.v1.RuntimeService/GetRuntimeStatus")(
                b"", metadata=[("authorization", f"Bearer {signing_key.token()}")], timeout=5
            )
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(missing.value) == "TOKEN_MISSING"
    assert garbage.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(garbage.value) == "TOKEN_INVALID"
    assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_reason(unrouted.value) == "UNIMPLEMENTED"
