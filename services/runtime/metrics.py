"""The runtime's metrics (OpenTelemetry; the process's MeterProvider exports them).

Labels stay low-cardinality: organization and model for what turns use and cost (as the
operators' design asks), an eviction's reason, a token's kind; never a session, turn or user.
Gauges and the pool's counters are read from the live objects when the metrics are collected:
every pool and model-endpoint check of the process registers itself, so replicas in one
process (tests, development) add up.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from corral.libs.metrics import LATENCY_BUCKETS
from corral.runtime.v1 import runtime_event_pb2 as pb
from corral.services.runtime import process
from corral.services.runtime.model_endpoint import ModelEndpoint
from corral.services.runtime.pool import ProcessPool

TOKEN_KINDS = ("input", "output", "cache_read", "cache_creation")

# The families as Prometheus names them (for dashboards, alert rules and tests).
EXPORTED: tuple[str, ...] = (
    "corral_runtime_tokens_total",
    "corral_runtime_cost_usd_total",
    "corral_runtime_cli_processes",
    "corral_runtime_cli_memory_bytes",
    "corral_runtime_pool_exhausted_total",
    "corral_runtime_pool_evictions_total",
    "corral_runtime_pool_waiting",
    "corral_runtime_pool_wait_seconds",
    "corral_runtime_model_endpoint_up",
)


class RuntimeMetrics:
    """The instruments (one set per meter, see :func:`for_meter`)."""

    def __init__(self, meter: Meter) -> None:
        self._pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()
        self._endpoints: weakref.WeakSet[ModelEndpoint] = weakref.WeakSet()
        self.tokens = meter.create_counter(
            "corral.runtime.tokens",
            "{token}",
            "Model tokens turns used, by organization, model and kind"
            " (input, output, cache_read, cache_creation)",
        )
        self.cost = meter.create_counter(
            "corral.runtime.cost.usd", "{USD}", "What turns cost in USD, by organization and model"
        )
        meter.create_observable_gauge(
            "corral.runtime.cli.processes",
            [self._observe_processes],
            "{process}",
            "Live agent (Claude CLI) processes, counting those starting or stopping",
        )
        meter.create_observable_gauge(
            "corral.runtime.cli.memory",
            [self._observe_memory],
            "By",
            "Resident memory of the live agent processes and everything they started",
        )
        meter.create_observable_counter(
            "corral.runtime.pool.exhausted",
            [self._observe_exhausted],
            "{turn}",
            "Turns refused because every process was running a turn and the queue of turns"
            " waiting for one was full (POOL_EXHAUSTED)",
        )
        meter.create_observable_gauge(
            "corral.runtime.pool.waiting",
            [self._observe_waiting],
            "{turn}",
            "Turns waiting for an agent process now (every one is running a turn)",
        )
        self.pool_wait = meter.create_histogram(
            "corral.runtime.pool.wait",
            "s",
            "How long each turn waited for an agent process (0 when one was free)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        meter.create_observable_counter(
            "corral.runtime.pool.evictions",
            [self._observe_evictions],
            "{process}",
            "Processes stopped to free their slot, by reason: lru (for another session),"
            " replaced (the session needed another kind), idle (the reaper)",
        )
        meter.create_observable_gauge(
            "corral.runtime.model_endpoint.up",
            [self._observe_endpoint],
            "1",
            "1 when the model endpoint answered its last check, 0 when not",
        )

    def track_pool(self, pool: ProcessPool) -> None:
        self._pools.add(pool)

    def track_endpoint(self, endpoint: ModelEndpoint) -> None:
        self._endpoints.add(endpoint)

    def turn_ended(self, organization: str, model: str, result: pb.TurnResult) -> None:
        """What a turn used and cost (every turn that reached a process, whatever its end)."""
        usage = result.usage
        labels = {"organization": organization, "model": model}
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        )
        for kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count:
                self.tokens.add(count, {**labels, "kind": kind})
        if usage.cost_usd_micros:
            self.cost.add(usage.cost_usd_micros / 1_000_000, labels)

    def _observe_processes(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(pool.live for pool in list(self._pools)))

    def _observe_memory(self, _: CallbackOptions) -> Iterable[Observation]:
        pids = [pid for pool in list(self._pools) for pid in pool.pids()]
        yield Observation(process.tree_rss(pids))

    def _observe_exhausted(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(pool.exhausted for pool in list(self._pools)))

    def _observe_waiting(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(pool.waiting for pool in list(self._pools)))

    def _observe_evictions(self, _: CallbackOptions) -> Iterable[Observation]:
        pools = list(self._pools)
        for reason in ("lru", "replaced", "idle"):
            total = sum(pool.evictions[reason] for pool in pools)
            yield Observation(total, {"reason": reason})

    def _observe_endpoint(self, _: CallbackOptions) -> Iterable[Observation]:
        known = [e.reachable for e in list(self._endpoints) if e.reachable is not None]
        if known:
            yield Observation(1 if all(known) else 0)


_by_meter: dict[int, tuple[Meter, RuntimeMetrics]] = {}


def for_meter(meter: Meter | None = None) -> RuntimeMetrics:
    """The instruments on ``meter`` (default: the process's meter for the runtime), created
    once per meter."""
    if meter is None:
        meter = default_meter()
    found = _by_meter.get(id(meter))
    if found is None or found[0] is not meter:
        found = (meter, RuntimeMetrics(meter))
        _by_meter[id(meter)] = found
    return found[1]


_default: list[Meter] = []


def default_meter() -> Meter:
    """The process's meter for the runtime (got once: the API's proxy meter follows whichever
    MeterProvider the process installs, before or after)."""
    if not _default:
        _default.append(metrics.get_meter("corral.runtime"))
    return _default[0]
