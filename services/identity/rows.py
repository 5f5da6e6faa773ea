"""Rows <-> domain objects: one reader and (where rows are written whole) one writer per table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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

Row = sa.Row[Any]


def organization(row: Row) -> Organization:
    m = row._mapping
    return Organization(
        id=m["id"],
        display_name=m["display_name"],
        state=State(m["state"]),
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


def organization_values(org: Organization) -> dict[str, Any]:
    return {
        "id": org.id,
        "display_name": org.display_name,
        "state": org.state.value,
        "create_time": org.create_time,
        "update_time": org.update_time,
        "version": org.version,
    }


def user(row: Row) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        organization_id=m["organization_id"],
        email=m["email"],
        display_name=m["display_name"],
        role=Role(m["role"]),
        password_hash=m["password_hash"],
        state=State(m["state"]),
        superuser=m["superuser"],
        token_generation=m["token_generation"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        last_login_time=m["last_login_time"],
        version=m["version"],
    )


def user_values(value: User) -> dict[str, Any]:
    return {
        "id": value.id,
        "organization_id": value.organization_id,
        "email": value.email,
        "display_name": value.display_name,
        "role": value.role.value,
        "password_hash": value.password_hash,
        "state": value.state.value,
        "superuser": value.superuser,
        "token_generation": value.token_generation,
        "create_time": value.create_time,
        "update_time": value.update_time,
        "last_login_time": value.last_login_time,
        "version": value.version,
    }


def service_account(row: Row) -> ServiceAccount:
    m = row._mapping
    return ServiceAccount(
        id=m["id"],
        organization_id=m["organization_id"],
        display_name=m["display_name"],
        description=m["description"],
        role=Role(m["role"]),
        internal=m["internal"],
        deleted=m["deleted"],
        token_generation=m["token_generation"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


def service_account_values(account: ServiceAccount) -> dict[str, Any]:
    return {
        "id": account.id,
        "organization_id": account.organization_id,
        "display_name": account.display_name,
        "description": account.description,
        "role": account.role.value,
        "internal": account.internal,
        "deleted": account.deleted,
        "token_generation": account.token_generation,
        "create_time": account.create_time,
        "update_time": account.update_time,
        "version": account.version,
    }


def api_key(row: Row) -> ApiKey:
    m = row._mapping
    return ApiKey(
        id=m["id"],
        organization_id=m["organization_id"],
        service_account_id=m["service_account_id"],
        display_name=m["display_name"],
        lookup=m["lookup"],
        secret_hash=m["secret_hash"],
        expire_time=m["expire_time"],
        create_time=m["create_time"],
        last_use_time=m["last_use_time"],
        revoke_time=m["revoke_time"],
    )


def api_key_values(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "organization_id": key.organization_id,
        "service_account_id": key.service_account_id,
        "display_name": key.display_name,
        "lookup": key.lookup,
        "secret_hash": key.secret_hash,
        "expire_time": key.expire_time,
        "create_time": key.create_time,
        "last_use_time": key.last_use_time,
        "revoke_time": key.revoke_time,
    }


def refresh_token(row: Row) -> RefreshToken:
    """A ``refresh_tokens`` row joined with its family's ``revoke_time``."""
    m = row._mapping
    return RefreshToken(
        id=m["id"],
        family_id=m["family_id"],
        user_id=m["user_id"],
        organization_id=m["organization_id"],
        token_hash=m["token_hash"],
        expire_time=m["expire_time"],
        create_time=m["create_time"],
        used_time=m["used_time"],
        family_revoked=m["revoke_time"] is not None,
    )


def refresh_token_values(token: RefreshToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "family_id": token.family_id,
        "user_id": token.user_id,
        "organization_id": token.organization_id,
        "token_hash": token.token_hash,
        "create_time": token.create_time,
        "expire_time": token.expire_time,
        "used_time": None,
    }


def signing_key(row: Row) -> SigningKeyRecord:
    m = row._mapping
    return SigningKeyRecord(
        kid=m["kid"],
        algorithm=m["algorithm"],
        state=KeyState(m["state"]),
        private_key=bytes(m["private_key"]),
        public_jwk=json.loads(m["public_jwk"]),
        create_time=m["create_time"],
        activate_time=m["activate_time"],
        retire_time=m["retire_time"],
        unpublish_time=m["unpublish_time"],
    )


def signing_key_values(key: SigningKeyRecord) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "algorithm": key.algorithm,
        "state": key.state.value,
        "private_key": key.private_key,
        "public_jwk": json.dumps(key.public_jwk),
        "create_time": key.create_time,
        "activate_time": key.activate_time,
        "retire_time": key.retire_time,
        "unpublish_time": key.unpublish_time,
    }


def quota(row: Row) -> Quota:
    m = row._mapping
    return Quota(
        subject=m["subject"],
        organization_id=m["organization_id"],
        limits={name: m[name] for name in LIMIT_FIELDS},
        update_time=m["update_time"],
        version=m["version"],
    )


def amounts_json(amounts: Mapping[UsageKind, int]) -> str:
    return json.dumps({k.value: v for k, v in amounts.items()})


def _amounts(text: str) -> dict[UsageKind, int]:
    return {UsageKind(k): int(v) for k, v in json.loads(text).items()}


def reservation(row: Row) -> Reservation:
    m = row._mapping
    return Reservation(
        id=m["id"],
        organization_id=m["organization_id"],
        subject=m["subject"],
        amounts=_amounts(m["amounts"]),
        settled_amounts=_amounts(m["settled_amounts"]),
        reference=m["reference"],
        request_id=m["request_id"],
        period=m["period"],
        state=ReservationState(m["state"]),
        create_time=m["create_time"],
        expire_time=m["expire_time"],
        settle_time=m["settle_time"],
        end_time=m["end_time"],
    )


def reservation_values(r: Reservation) -> dict[str, Any]:
    return {
        "id": r.id,
        "organization_id": r.organization_id,
        "subject": r.subject,
        "amounts": amounts_json(r.amounts),
        "settled_amounts": amounts_json(r.settled_amounts),
        "reference": r.reference,
        "request_id": r.request_id,
        "period": r.period,
        "state": r.state.value,
        "create_time": r.create_time,
        "expire_time": r.expire_time,
        "settle_time": r.settle_time,
        "end_time": r.end_time,
    }


def audit_event(row: Row) -> AuditEvent:
    m = row._mapping
    return AuditEvent(
        seq=m["seq"],
        organization_id=m["organization_id"],
        event_time=m["event_time"],
        actor=m["actor"],
        action=m["action"],
        resource=m["resource"],
        outcome=Outcome(m["outcome"]),
        status_code=m["status_code"],
        source_ip=m["source_ip"],
        user_agent=m["user_agent"],
        request_id=m["request_id"],
        service=m["service"],
        metadata=json.loads(m["metadata"]),
        create_time=m["create_time"],
    )


def audit_event_values(e: AuditEvent) -> dict[str, Any]:
    """The stored row (``seq`` is assigned by the database); long texts are cut to fit."""
    return {
        "organization_id": e.organization_id,
        "event_time": e.event_time,
        "actor": e.actor[:300],
        "action": e.action[:200],
        "resource": e.resource[:300],
        "outcome": e.outcome.value,
        "status_code": e.status_code,
        "source_ip": e.source_ip[:64],
        "user_agent": e.user_agent[:256],
        "request_id": e.request_id[:128],
        "service": e.service[:32],
        "metadata": json.dumps(e.metadata),
        "create_time": e.create_time,
    }
