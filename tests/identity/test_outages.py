"""Identity through an outage of its own PostgreSQL (a cluster of the test's, stopped and
started for real): sign-in, reads and the ledger answer UNAVAILABLE (DATABASE_UNAVAILABLE,
with a RetryInfo), never INTERNAL, and work again as soon as the database is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import usage_pb2
from tests.identity.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, IdentityFactory, bearer
from tests.libs.stores import own_postgres
from tests.support.grpc_tools import error_reason

ORG = "organizations/default"


def _retry_info(error: grpc.aio.AioRpcError) -> bool:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return status is not None and any(
        d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # its own cluster instead
async def test_identity_answers_unavailable_while_its_database_is_down(
    make_identity: IdentityFactory, tmp_path: Path
) -> None:
    async with own_postgres(tmp_path) as cluster:
        identity = await make_identity(
            identity_database_url=cluster.url, identity_database_schema="identity"
        )
        root = await identity.root()
        reserve = pb.ReserveUsageRequest(
            parent=ORG,
            subject=ORG,
            amounts=[usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_SESSIONS, amount=1)],
            ttl=duration_pb2.Duration(seconds=60),
            request_id="outage-1",  # a retry of the same reservation
        )
        calls: list[Any] = [
            lambda: identity.login(ADMIN_EMAIL, ADMIN_PASSWORD),
            lambda: identity.stub.GetQuota(
                pb.GetQuotaRequest(name=f"{ORG}/quota"), metadata=bearer(root)
            ),
            lambda: identity.stub.ReserveUsage(reserve, metadata=bearer(root)),
        ]
        for call in calls[1:]:
            await call()  # the server has served a while: its verifier holds the keys
        await cluster.stop("fast")
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert error_reason(caught.value) == "DATABASE_UNAVAILABLE"
            assert _retry_info(caught.value)

        await cluster.start()
        started = time.monotonic()
        while True:
            failure: grpc.aio.AioRpcError | None = None
            try:
                await calls[0]()
            except grpc.aio.AioRpcError as error:
                failure = error
            if failure is None:
                break
            assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure.details()
            assert time.monotonic() - started < 60
            await asyncio.sleep(0.05)
        first_ok = time.monotonic() - started
        for call in calls[1:]:
            await call()
        print(f"\nidentity: PostgreSQL back, first OK sign-in after {first_ok:.2f} s")
