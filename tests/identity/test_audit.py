"""The audit log: identity's own security events, events other services write, and reading it."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from corral.identity.v1 import audit_event_pb2, role_pb2, user_pb2
from corral.identity.v1 import identity_service_pb2 as pb
from tests.identity.conftest import Identity, bearer, fails
from tests.identity.world import create_user

ORG = "organizations/default"


async def _events(
    identity: Identity, root: str, filter_text: str, parent: str = ORG
) -> list[audit_event_pb2.AuditEvent]:
    reply = await identity.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(parent=parent, filter=filter_text), metadata=bearer(root)
    )
    return list(reply.audit_events)


async def test_logins_and_role_changes_are_audited(identity: Identity) -> None:
    root = await identity.root()
    user = await create_user(identity, root, ORG, role_pb2.ROLE_USER, "audited")
    await fails(identity.login(user.email, "not the password"), grpc.StatusCode.UNAUTHENTICATED)
    await identity.login(user.email)
    await identity.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(name=user.name, role=role_pb2.ROLE_VIEWER),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=bearer(root),
    )
    logins = await _events(
        identity, root, f'action = "identity.login" AND resource = "{user.name}"'
    )
    outcomes = [e.outcome for e in logins]
    assert outcomes == [
        audit_event_pb2.AuditEvent.OUTCOME_SUCCEEDED,  # newest first
        audit_event_pb2.AuditEvent.OUTCOME_DENIED,
    ]
    assert all(e.source_ip == "127.0.0.1" and e.service == "identity" for e in logins)
    assert logins[1].metadata["reason"] == "INVALID_CREDENTIALS"
    changes = await _events(identity, root, 'action = "identity.users.role_change"')
    assert len(changes) == 1
    assert dict(changes[0].metadata) == {"old_role": "user", "new_role": "viewer"}
    assert changes[0].actor.startswith(f"{ORG}/users/")
    # Unknown emails are audited too, with no organization: only superusers see them.
    await fails(
        identity.login("ghost@nowhere.test", "whatever it is"), grpc.StatusCode.UNAUTHENTICATED
    )
    everywhere = await _events(
        identity, root, 'outcome = DENIED AND action = "identity.login"', "organizations/-"
    )
    assert any(e.metadata.get("email") == "ghost@nowhere.test" for e in everywhere)


async def test_written_events_are_idempotent_filterable_and_paged(identity: Identity) -> None:
    root = await identity.root()
    events = [
        audit_event_pb2.AuditEvent(
            event_time=timestamp_pb2.Timestamp(seconds=1_750_000_000 + i),
            actor=f"{ORG}/users/u{i % 2}",
            organization=ORG,
            action="/corral.session.v1.SessionService/SendMessage",
            resource=f"sessions/s{i}",
            outcome=audit_event_pb2.AuditEvent.OUTCOME_SUCCEEDED,
            service="session",
            metadata={"turn": str(i)},
        )
        for i in range(7)
    ]
    request_id = str(uuid.uuid4())
    request = pb.WriteAuditEventsRequest(parent=ORG, audit_events=events, request_id=request_id)
    assert (await identity.stub.WriteAuditEvents(request, metadata=bearer(root))).written_count == 7
    assert (await identity.stub.WriteAuditEvents(request, metadata=bearer(root))).written_count == 0

    seen: list[str] = []
    token = ""
    while True:
        reply = await identity.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(
                parent=ORG,
                filter='service = "session" AND resource = "sessions/*"',
                page_size=3,
                page_token=token,
            ),
            metadata=bearer(root),
        )
        seen += [e.resource for e in reply.audit_events]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [f"sessions/s{i}" for i in reversed(range(7))]
    mine = await _events(
        identity, root, f'actor = "{ORG}/users/u1" AND event_time >= "2025-06-15T15:06:43Z"'
    )
    assert [e.resource for e in mine] == ["sessions/s5", "sessions/s3"]
    await fails(
        identity.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(parent=ORG, filter="colour = red"), metadata=bearer(root)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
    )
    await fails(
        identity.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(parent=ORG, page_token=reply.next_page_token or "bm9wZQ"),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
