"""Benchmark: what the shared kit costs per call, as a ratio to a bare grpc.aio server.

Both servers run in this process on the same event loop and answer the same no-op unary
method with real protobuf serialisation over loopback. The kit server adds everything a Corral
service runs per call: OpenTelemetry, request id, JWT verification (ES256, cached JWKS) and the
revocation feed's check, the page-token key, the lenient request decoding, structured logging
at INFO (to a null handler) and error mapping. Metrics are measured on against off in the same
run: a second kit server records no RPC metrics, and two kit client channels differ only in
their metrics interceptor (the process's MeterProvider is the real one, read by Prometheus'
reader as in production). Run with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.auth.revocation import InMemoryRevocations, Revocation, RevocationList
from corral.libs.grpc.client import create_channel
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.libs.listing import PageTokenKeyHook
from corral.libs.metrics import configure_metrics, exposition
from corral.libs.observability import configure_tracing
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

SERVICE = "corral.bench.v1.BenchService"


async def _noop(request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
    return request


def _generic() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Noop": grpc.unary_unary_rpc_method_handler(
                _noop,
                request_deserializer=struct_pb2.Struct.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            )
        },
    )


async def _measure(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    for _ in range(min(200, count)):
        await call()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6,
        "calls_per_s": len(samples) / sum(samples),
    }


async def main(count: int, rounds: int) -> None:
    logging.getLogger("corral.rpc").addHandler(logging.NullHandler())
    logging.getLogger("corral.rpc").propagate = False
    logging.getLogger("corral.rpc").setLevel(logging.INFO)
    configure_tracing("bench", "")
    configure_metrics("bench")
    key = SigningKey.generate()
    token = key.token()
    revocations = InMemoryRevocations()
    await revocations.publish(Revocation("subject", "organizations/acme/users/someone-else", 1e9))
    verifier = TokenVerifier(
        StaticJwksSource(key.jwks()),
        issuer=ISSUER,
        audience=AUDIENCE,
        revocations=RevocationList(revocations),
    )

    bare = grpc.aio.server()
    bare.add_generic_rpc_handlers((_generic(),))
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()

    def kit_server(metrics: bool) -> CorralServer:
        return CorralServer(
            ServerConfig(
                name="bench",
                hooks=[AuthenticationHook(verifier), PageTokenKeyHook(b"bench page-token key")],
                metrics=metrics,
            ),
            [ServiceRegistration(SERVICE, lambda s: s.add_generic_rpc_handlers((_generic(),)))],
        )

    kit = kit_server(metrics=True)
    unmetered = kit_server(metrics=False)
    await kit.start()
    await unmetered.start()

    request = struct_pb2.Struct()
    request.update({"session": "sessions/abc", "n": 1})
    names = ("bare", "kit", "kit-no-metrics", "client-metrics", "client-no-metrics")
    results: dict[str, list[float]] = {name: [] for name in names}
    auth = (("authorization", f"Bearer {token}"),)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}") as bare_channel,
            grpc.aio.insecure_channel(kit.address) as kit_channel,
            grpc.aio.insecure_channel(unmetered.address) as unmetered_channel,
            create_channel(kit.address, token_provider=None, tracing=False) as metered_client,
            create_channel(
                kit.address, token_provider=None, tracing=False, metrics=False
            ) as plain_client,
        ):

            def caller(
                channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
            ) -> Callable[[], Awaitable[Any]]:
                method = channel.unary_unary(
                    f"/{SERVICE}/Noop",
                    request_serializer=struct_pb2.Struct.SerializeToString,
                    response_deserializer=struct_pb2.Struct.FromString,
                )
                return lambda: method(request, metadata=metadata)

            calls = {
                "bare": caller(bare_channel, ()),
                "kit": caller(kit_channel, auth),
                "kit-no-metrics": caller(unmetered_channel, auth),
                "client-metrics": caller(metered_client, auth),
                "client-no-metrics": caller(plain_client, auth),
            }
            for _ in range(rounds):  # interleaved rounds so drift hits both alike
                for name, call in calls.items():
                    results[name].extend(await _measure(call, count))
    finally:
        await kit.stop(0)
        await unmetered.stop(0)
        await bare.stop(0)
    # The metrics were really recorded (and exported in Prometheus' format) while measured.
    assert b'corral_rpc_server_requests_total{code="OK",method="Noop"' in exposition()

    bare_s, kit_s = _summary(results["bare"]), _summary(results["kit"])
    print(f"kit overhead per unary call ({rounds} x {count} calls each, sequential, loopback)")
    for name, summary in (("bare grpc.aio", bare_s), ("corral kit", kit_s)):
        print(
            f"  {name:<14} p50 {summary['p50_us']:8.1f} us   p99 {summary['p99_us']:8.1f} us"
            f"   {summary['calls_per_s']:8.0f} calls/s"
        )
    print(
        f"  ratio kit/bare: p50 {kit_s['p50_us'] / bare_s['p50_us']:.2f}x"
        f"   throughput {kit_s['calls_per_s'] / bare_s['calls_per_s']:.2%} of bare"
        f"   added p50 {kit_s['p50_us'] - bare_s['p50_us']:.1f} us"
    )
    print(f"  spread: stdev kit {statistics.pstdev(results['kit']) * 1e6:.1f} us")
    off, client_on, client_off = (
        _summary(results[n]) for n in ("kit-no-metrics", "client-metrics", "client-no-metrics")
    )
    print("metrics on against off (same run, same calls)")
    for label, on, without in (
        ("server side", kit_s, off),
        ("client side", client_on, client_off),
    ):
        print(
            f"  {label}: p50 {on['p50_us']:.1f} us on, {without['p50_us']:.1f} us off"
            f"   ratio on/off {on['p50_us'] / without['p50_us']:.3f}x"
            f"   added p50 {on['p50_us'] - without['p50_us']:.1f} us"
            f"   throughput {on['calls_per_s'] / without['calls_per_s']:.2%} of off"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.rounds))
