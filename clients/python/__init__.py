"""``corral.client``: Corral's API from Python (asyncio, typed, over the generated stubs).

    from corral.client import Client

    async with Client("127.0.0.1:8080") as corral:
        await corral.login("admin@corral.local", password)
        session = await corral.create_session("ops")
        turn = await corral.send_message(session.name, "hello")
        async for event in corral.turn_events(session.name, turn):
            print(event.WhichOneof("payload"))

Sign-in and token refresh, retries with backoff on ``UNAVAILABLE`` for calls that are safe to
repeat, an event stream that resumes by sequence across reconnects, errors raised as
``ApiError`` subclasses carrying the ``ErrorInfo`` reason, and file transfers (``upload_file``,
``download_file``: chunked, resumed after a dropped connection, checked by SHA-256, with
progress). Its source lives in ``clients/python`` (imported as ``corral.client``); the Go
client is in ``clients/go``.
"""

from corral.client.calls import RetryPolicy
from corral.client.client import Client
from corral.client.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from corral.client.files import FileChangedError, Progress, download_file, upload_file

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FileChangedError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Progress",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "download_file",
    "upload_file",
]
