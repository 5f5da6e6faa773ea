"""Server reflection, both protocol versions, and what it lists through the edge.

Every server answers ``grpc.reflection.v1alpha.ServerReflection`` and
``grpc.reflection.v1.ServerReflection`` (the two are wire-identical; grpcio-reflection ships only
the first, so v1 is the same servicer under the v1 name). Called directly, a server lists its own
services. Called through the edge, which adds ``x-corral-edge-reflection`` to reflection calls
(and strips every client-sent ``x-corral-*`` header first), it lists the whole public API, so
``grpcurl``/``buf curl`` against :8080 find every service the edge routes, whichever upstream
answered. Listing the public API's descriptors reveals nothing: they are the published protos.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

EDGE_HEADER = "x-corral-edge-reflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
# The services the edge routes, and the generated module that registers each descriptor.
PUBLIC_API = {
    "corral.identity.v1.IdentityService": "corral.identity.v1.identity_service_pb2",
    "corral.session.v1.SessionService": "corral.session.v1.session_service_pb2",
    "corral.task.v1.TaskService": "corral.task.v1.task_service_pb2",
    "corral.storage.v1.StorageService": "corral.storage.v1.storage_service_pb2",
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ALWAYS = (HEALTH, reflection.SERVICE_NAME, V1_SERVICE)


def _describe_v1() -> None:
    """grpcio-reflection ships only v1alpha's descriptor; v1's is the same file under another
    package, so it is added to the pool here, and tools can resolve every service listed."""
    pool = descriptor_pool.Default()
    name = "grpc_reflection/v1/reflection.proto"  # as grpcio names v1alpha's file
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = name, "grpc.reflection.v1"
    file.options.Clear()
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in file.message_type:  # the messages nest nothing
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(file)


class Reflection:
    """One server's reflection: its own services, or the public API when the edge asks."""

    def __init__(self, own: Sequence[str]) -> None:
        self._own = ReflectionServicer([*own, *ALWAYS])
        self._edge: ReflectionServicer | None = None

    def _for_edge(self) -> ReflectionServicer:
        if self._edge is None:
            for module in PUBLIC_API.values():  # their descriptors join the default pool
                importlib.import_module(module)
            self._edge = ReflectionServicer([*PUBLIC_API, *ALWAYS])
        return self._edge

    async def ServerReflectionInfo(
        self,
        requests: AsyncIterator[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        metadata = context.invocation_metadata() or ()
        through_edge = any(key == EDGE_HEADER for key, _ in metadata)
        servicer = self._for_edge() if through_edge else self._own
        async for response in servicer.ServerReflectionInfo(requests, context):
            yield response


def enable(server: grpc.aio.Server, own: Sequence[str]) -> Reflection:
    """Serve reflection (v1alpha and v1) on ``server`` for its ``own`` services."""
    _describe_v1()
    servicer = Reflection(own)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (reflection.SERVICE_NAME, V1_SERVICE)
        )
    )
    return servicer
