"""Rows <-> domain objects. A column and the dataclass field of the same name carry the same
value; enums are stored as their values; the few columns stored otherwise (JSON texts, the
refresh token's family state) say so here."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields
from enum import Enum
from typing import Any, TypeVar

import sqlalchemy as sa

from corral.services.identity.domain import (
    LIMIT_FIELDS,
    ApiKey,
    AuditEvent,
    KeyState,
    Organization,
    Outcome,
    Quota,
    RefreshToken,
    Reservation,
    ReservationState,
    Role,
    ServiceAccount,
    SigningKeyRecord,
    State,
    UsageKind,
    User,
)
from corral.services.identity.tables import (
    api_keys,
    audit_events,
    organizations,
    refresh_tokens,
    reservations,
    service_accounts,
    signing_keys,
    users,
)

T = TypeVar("T")
Row = sa.Row[Any]


def _reader(cls: type[T], **convert: Callable[[Any], Any]) -> Callable[[Row], T]:
    """Rows to ``cls``: each field from its column, through ``convert[field]`` if given."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]

    def read(row: Row) -> T:
        m = row._mapping
        values = {
            n: convert[n](m) if n in convert else m[n] for n in names if n in m or n in convert
        }
        return cls(**values)

    return read


def _writer(table: sa.Table, **convert: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    """An object to the values of ``table``'s row: each column from the field of its name
    (an enum as its value), through ``convert[column]`` if given."""
    columns = [c.name for c in table.columns if c.autoincrement is not True]

    def values(obj: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in columns:
            if name in convert:
                found[name] = convert[name](obj)
            elif hasattr(obj, name):
                value = getattr(obj, name)
                found[name] = value.value if isinstance(value, Enum) else value
        return found

    return values


def _amounts_of(text: str) -> dict[UsageKind, int]:
    return {UsageKind(k): int(v) for k, v in json.loads(text).items()}


def amounts_json(amounts: Mapping[UsageKind, int]) -> str:
    return json.dumps({k.value: v for k, v in amounts.items()})


organization = _reader(Organization, state=lambda m: State(m["state"]))
organization_values = _writer(organizations)

user = _reader(User, role=lambda m: Role(m["role"]), state=lambda m: State(m["state"]))
user_values = _writer(users)

service_account = _reader(ServiceAccount, role=lambda m: Role(m["role"]))
service_account_values = _writer(service_accounts)

api_key = _reader(ApiKey)
api_key_values = _writer(api_keys)

# A refresh_tokens row joined with its family's revoke_time; a new token is unused.
refresh_token = _reader(RefreshToken, family_revoked=lambda m: m["revoke_time"] is not None)
refresh_token_values = _writer(refresh_tokens, used_time=lambda _: None)

signing_key = _reader(
    SigningKeyRecord,
    state=lambda m: KeyState(m["state"]),
    private_key=lambda m: bytes(m["private_key"]),
    public_jwk=lambda m: json.loads(m["public_jwk"]),
)
signing_key_values = _writer(signing_keys, public_jwk=lambda k: json.dumps(k.public_jwk))

quota = _reader(Quota, limits=lambda m: {name: m[name] for name in LIMIT_FIELDS})

reservation = _reader(
    Reservation,
    amounts=lambda m: _amounts_of(m["amounts"]),
    settled_amounts=lambda m: _amounts_of(m["settled_amounts"]),
    state=lambda m: ReservationState(m["state"]),
)
reservation_values = _writer(
    reservations,
    amounts=lambda r: amounts_json(r.amounts),
    settled_amounts=lambda r: amounts_json(r.settled_amounts),
)

audit_event = _reader(
    AuditEvent,
    outcome=lambda m: Outcome(m["outcome"]),
    metadata=lambda m: json.loads(m["metadata"]),
)
# The stored row (``seq`` is assigned by the database); long texts are cut to fit.
audit_event_values = _writer(
    audit_events,
    **{
        name: (lambda e, name=name, size=size: getattr(e, name)[:size])
        for name, size in (
            ("actor", 300),
            ("action", 200),
            ("resource", 300),
            ("source_ip", 64),
            ("user_agent", 256),
            ("request_id", 128),
            ("service", 32),
        )
    },
    metadata=lambda e: json.dumps(e.metadata),
)
