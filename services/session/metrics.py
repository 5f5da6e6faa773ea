"""The session service's metrics (OpenTelemetry; the process's MeterProvider exports them).

Labels stay low-cardinality: a turn's status, an event's type; never a session, turn or user.
The gauges are read from the live objects when the metrics are collected (no counting up and
down that could drift): every runner and event log of the process registers itself here, so
replicas in one process (tests, development) add up.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

# Seconds, from a tenth of a second to an hour: turns are slow.
TURN_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
FIRST_EVENT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

# The families as Prometheus names them (for dashboards, alert rules and tests).
EXPORTED: tuple[str, ...] = (
    "corral_session_sessions_created_total",
    "corral_session_turns_completed_total",
    "corral_session_turn_duration_seconds",
    "corral_session_turn_time_to_first_event_seconds",
    "corral_session_events_appended_total",
    "corral_session_turns_queued",
    "corral_session_streams_live",
    "corral_session_permission_requests_waiting",
)


class RunnerState(Protocol):
    def queued_turns(self) -> int: ...

    def waiting_permission_requests(self) -> int: ...


class StreamState(Protocol):
    def live_streams(self) -> int: ...


class SessionMetrics:
    """The instruments (one set per meter, see :func:`for_meter`)."""

    def __init__(self, meter: Meter) -> None:
        self._runners: weakref.WeakSet[RunnerState] = weakref.WeakSet()
        self._logs: weakref.WeakSet[StreamState] = weakref.WeakSet()
        self.sessions_created = meter.create_counter(
            "corral.session.sessions.created", "{session}", "Sessions created (forks included)"
        )
        self.turns_completed = meter.create_counter(
            "corral.session.turns.completed", "{turn}", "Turns ended, by status"
        )
        self.turn_duration = meter.create_histogram(
            "corral.session.turn.duration",
            "s",
            "From a turn's start (RUNNING) to its end, by status",
            explicit_bucket_boundaries_advisory=TURN_SECONDS,
        )
        self.time_to_first_event = meter.create_histogram(
            "corral.session.turn.time_to_first_event",
            "s",
            "From SendMessage accepting a turn to the agent's first event (turn_started) in"
            " the log; the runtime's waiting_for_agent does not count",
            explicit_bucket_boundaries_advisory=FIRST_EVENT_SECONDS,
        )
        self.events_appended = meter.create_counter(
            "corral.session.events.appended", "{event}", "Events written to session logs, by type"
        )
        meter.create_observable_gauge(
            "corral.session.turns.queued",
            [self._observe_queued],
            "{turn}",
            "Turns accepted by this replica and not started yet",
        )
        meter.create_observable_gauge(
            "corral.session.streams.live",
            [self._observe_streams],
            "{stream}",
            "Open StreamSessionEvents calls (watchers) on this replica",
        )
        meter.create_observable_gauge(
            "corral.session.permission_requests.waiting",
            [self._observe_permissions],
            "{request}",
            "Permission requests of this replica's turns waiting for a person",
        )

    def track_runner(self, runner: RunnerState) -> None:
        self._runners.add(runner)

    def track_log(self, log: StreamState) -> None:
        self._logs.add(log)

    def _observe_queued(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(r.queued_turns() for r in list(self._runners)))

    def _observe_streams(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(e.live_streams() for e in list(self._logs)))

    def _observe_permissions(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(r.waiting_permission_requests() for r in list(self._runners)))


_by_meter: dict[int, tuple[Meter, SessionMetrics]] = {}


def for_meter(meter: Meter | None = None) -> SessionMetrics:
    """The instruments on ``meter`` (default: the process's meter for the session service),
    created once per meter."""
    if meter is None:
        meter = default_meter()
    found = _by_meter.get(id(meter))
    if found is None or found[0] is not meter:
        found = (meter, SessionMetrics(meter))
        _by_meter[id(meter)] = found
    return found[1]


_default: list[Meter] = []


def default_meter() -> Meter:
    """The process's meter for the session service (got once: the API's proxy meter follows
    whichever MeterProvider the process installs, before or after)."""
    if not _default:
        _default.append(metrics.get_meter("corral.session"))
    return _default[0]
