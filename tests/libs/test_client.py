"""The typed client factory: retries only idempotent methods (read from the protos), deadlines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from corral.identity.v1 import identity_service_pb2 as pb
from corral.libs.grpc.client import create_channel, idempotent_methods, service_config
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration

IDENTITY = pb.DESCRIPTOR.services_by_name["IdentityService"]


def test_only_idempotent_methods_get_a_retry_policy() -> None:
    methods = set(idempotent_methods(IDENTITY))
    assert {"GetOrganization", "ListUsers", "GetJwks"} <= methods
    assert not {"CreateOrganization", "Login", "ReserveUsage"} & methods
    config = json.loads(service_config([IDENTITY]))
    [policy] = config["methodConfig"]
    assert {"service": IDENTITY.full_name, "method": "GetOrganization"} in policy["name"]
    assert policy["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


class Flaky:
    """Answers UNAVAILABLE to the first ``failures`` calls of each method, counting attempts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}
        self.hang = asyncio.Event()

    def handler(self, name: str, response: Any) -> grpc.RpcMethodHandler:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.attempts[name] = self.attempts.get(name, 0) + 1
            if name == "GetJwks":
                await self.hang.wait()
            if self.attempts[name] <= self.failures:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=lambda b: b,
            response_serializer=lambda m: m.SerializeToString(),
        )


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[str, Flaky]]:
    state = Flaky(failures=2)
    handlers = {
        "GetOrganization": state.handler("GetOrganization", pb.GetOrganizationResponse()),
        "CreateOrganization": state.handler("CreateOrganization", pb.CreateOrganizationResponse()),
        "GetJwks": state.handler("GetJwks", pb.GetJwksResponse()),
    }
    generic = grpc.method_handlers_generic_handler(IDENTITY.full_name, handlers)
    server = CorralServer(
        ServerConfig(name="flaky", tracing=False),
        [ServiceRegistration(IDENTITY.full_name, lambda s: s.add_generic_rpc_handlers((generic,)))],
    )
    await server.start()
    yield server.address, state
    state.hang.set()
    await server.stop(0)


async def test_idempotent_call_is_retried_and_mutation_is_not(flaky: tuple[str, Flaky]) -> None:
    from corral.identity.v1 import identity_service_pb2_grpc as rpc

    address, state = flaky
    async with create_channel(address, [IDENTITY], token_provider=None) as channel:
        stub = rpc.IdentityServiceStub(channel)
        await stub.GetOrganization(pb.GetOrganizationRequest(name="organizations/acme"))
        assert state.attempts["GetOrganization"] == 3  # two UNAVAILABLE, then success
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateOrganization(pb.CreateOrganizationRequest())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert state.attempts["CreateOrganization"] == 1  # never repeated: it has side effects


async def test_every_unary_call_gets_a_deadline(flaky: tuple[str, Flaky]) -> None:
    from corral.identity.v1 import identity_service_pb2_grpc as rpc

    address, _ = flaky
    async with create_channel(
        address, [IDENTITY], default_timeout=0.3, token_provider=None
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rpc.IdentityServiceStub(channel).GetJwks(pb.GetJwksRequest())
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
