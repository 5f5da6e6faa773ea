"""Client-side helpers tests use: error reasons, health checks, reflection listings, free
ports."""

from __future__ import annotations

import socket

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ``ErrorInfo.reason`` of a failed call; fails the test when there is none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"the error carries no google.rpc.Status: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("the error carries no ErrorInfo")


async def health_status(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def reflected_services(address: str) -> list[str]:
    """What ``grpcurl list`` shows: the server reflection service's listing."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        reply = await call.read()
        return sorted(s.name for s in reply.list_services_response.service)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
