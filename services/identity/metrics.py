"""Identity's metrics (OpenTelemetry; the process's MeterProvider exports them): sign-ins by
outcome, tokens issued, revocations published, usage reservations by outcome.

Labels stay low-cardinality: a method, an outcome (an error's stable reason, lowercased), a
grant, a revocation kind; never a user, organisation, key or reservation id.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.metrics import Meter

from corral.libs.errors import CorralError

# The families as Prometheus names them (for dashboards, alert rules and tests).
EXPORTED: tuple[str, ...] = (
    "corral_identity_sign_ins_total",
    "corral_identity_tokens_issued_total",
    "corral_identity_revocations_total",
    "corral_identity_reservations_total",
    "corral_identity_reservations_ended_total",
)


class IdentityMetrics:
    """The instruments (one set per meter, see :func:`for_meter`)."""

    def __init__(self, meter: Meter) -> None:
        self.sign_ins = meter.create_counter(
            "corral.identity.sign_ins",
            "{sign_in}",
            "Sign-ins by method (password, api_key) and outcome (succeeded, or the refusal's"
            " reason: invalid_credentials, login_throttled, ...)",
        )
        self.tokens_issued = meter.create_counter(
            "corral.identity.tokens.issued",
            "{token}",
            "Access tokens issued, by grant (password, refresh_token, api_key)",
        )
        self.revocations = meter.create_counter(
            "corral.identity.revocations",
            "{revocation}",
            "Token revocations, by kind and outcome (published, failed: the feed did not take it,"
            " unpublished: no feed is configured)",
        )
        self.reservations = meter.create_counter(
            "corral.identity.reservations",
            "{reservation}",
            "Usage reservations asked for, by outcome (reserved, quota_exceeded, or another"
            " refusal's reason)",
        )
        self.reservations_ended = meter.create_counter(
            "corral.identity.reservations.ended",
            "{reservation}",
            "Usage reservations ended, by how (settled, released, expired)",
        )

    def sign_in(self, method: str, error: BaseException | None) -> None:
        self.sign_ins.add(1, {"method": method, "outcome": outcome(error)})
        if error is None:
            self.tokens_issued.add(1, {"grant": method})


def outcome(error: BaseException | None) -> str:
    if error is None:
        return "succeeded"
    return error.reason.lower() if isinstance(error, CorralError) else "error"


_by_meter: dict[int, tuple[Meter, IdentityMetrics]] = {}
_default: list[Meter] = []


def for_meter(meter: Meter | None = None) -> IdentityMetrics:
    """The instruments on ``meter`` (default: the process's meter for identity, a proxy that
    follows whichever MeterProvider the process installs), created once per meter."""
    if meter is None:
        if not _default:
            _default.append(metrics.get_meter("corral.identity"))
        meter = _default[0]
    found = _by_meter.get(id(meter))
    if found is None or found[0] is not meter:
        found = (meter, IdentityMetrics(meter))
        _by_meter[id(meter)] = found
    return found[1]
