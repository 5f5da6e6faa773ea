"""RPC metrics, server and client side: requests, errors and latency by gRPC service, method
and status code (``corral_rpc_{server,client}_*``). The label values come from registered
methods and the fixed set of codes, so their cardinality is bounded."""

from __future__ import annotations

import time
from typing import Any

import grpc

from corral.libs.metrics import LATENCY_BUCKETS, meter

Attributes = dict[str, str]


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> ``("pkg.Service", "Method")``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


class RpcMetrics:
    """The instruments of one side (``server`` or ``client``) and a cache of label sets."""

    def __init__(self, side: str) -> None:
        m = meter(f"corral.rpc.{side}")
        self._requests = m.create_counter(
            f"corral.rpc.{side}.requests", description=f"gRPC calls ({side} side), by outcome"
        )
        self._errors = (
            m.create_counter(
                f"corral.rpc.{side}.errors", description="gRPC calls that ended other than OK"
            )
            if side == "server"
            else None
        )
        self._duration = m.create_histogram(
            f"corral.rpc.{side}.duration",
            unit="s",
            description=f"gRPC call latency ({side})",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._labels: dict[tuple[str, Any], Attributes] = {}

    def _attributes(self, method: str, code: grpc.StatusCode) -> Attributes:
        key = (method, code)
        attributes = self._labels.get(key)
        if attributes is None:
            service, name = split_method(method)
            attributes = {"service": service, "method": name, "code": str(code.name)}
            if len(self._labels) < 10_000:
                self._labels[key] = attributes
        return attributes

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        attributes = self._attributes(method, code)
        self._requests.add(1, attributes)
        self._duration.record(time.perf_counter() - started, attributes)
        if self._errors is not None and code is not grpc.StatusCode.OK:
            self._errors.add(1, attributes)


_sides: dict[str, RpcMetrics] = {}


def rpc_metrics(side: str) -> RpcMetrics:
    """One set of instruments per side for the whole process."""
    found = _sides.get(side)
    if found is None:
        found = _sides[side] = RpcMetrics(side)
    return found
