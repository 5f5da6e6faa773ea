"""What a refused or failed call raises: one exception per gRPC status code, each carrying the
``google.rpc.ErrorInfo`` reason Corral sends with every error, and the other details
(``BadRequest`` field violations, ``QuotaFailure``, ``RetryInfo``)."""

from __future__ import annotations

import grpc

from corral.libs import errors
from corral.libs.grpc.errors import from_rpc_error


class ApiError(Exception):
    """A call Corral answered with an error.

    ``code`` is the gRPC status; ``reason`` the stable ``ErrorInfo.reason`` (``NOT_FOUND``,
    ``TOKEN_EXPIRED``, ``QUOTA_EXCEEDED``, ...; see the protos' ``error_reason.proto``);
    ``violations`` the invalid fields ``(field, description)``; ``retry_after`` the seconds
    ``RetryInfo`` asks to wait; ``request_id`` the ``x-request-id`` to quote in a bug report.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        *,
        metadata: dict[str, str] | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message} ({reason})")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.violations = violations or []
        self.retry_after = retry_after
        self.request_id = request_id


class InvalidArgument(ApiError): ...


class NotFound(ApiError): ...


class AlreadyExists(ApiError): ...


class FailedPrecondition(ApiError): ...


class Aborted(ApiError): ...


class PermissionDenied(ApiError): ...


class Unauthenticated(ApiError): ...


class ResourceExhausted(ApiError): ...


class Unavailable(ApiError): ...


class DeadlineExceeded(ApiError): ...


class Unimplemented(ApiError): ...


class Internal(ApiError): ...


class DataLoss(ApiError):
    """Bytes that are not what they should be; ``download_file`` raises it when what arrived
    is not the file (reason ``CHECKSUM_MISMATCH``, ``SIZE_MISMATCH`` or ``OFFSET_MISMATCH``)."""


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}


def _request_id(error: grpc.aio.AioRpcError) -> str:
    for metadata in (error.trailing_metadata(), error.initial_metadata()):
        for key, value in tuple(metadata or ()):
            if key == "x-request-id":
                return str(value)
    return ""


def api_error(error: grpc.aio.AioRpcError) -> ApiError:
    """The exception for a failed call, its details decoded by the kit's one decoder."""
    code = error.code()
    message = error.details() or code.name
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        # Corral never says more about these than the request id (the kit's rule); the kit's
        # decoder is for services, which report a failed dependency instead.
        reason = "INTERNAL" if code == grpc.StatusCode.INTERNAL else "ERROR"
        return _BY_CODE.get(code, ApiError)(code, message, reason, request_id=_request_id(error))
    decoded = from_rpc_error(error)
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    if isinstance(decoded, errors.InvalidArgument):
        violations = [(v.field, v.description) for v in decoded.violations]
    elif isinstance(decoded, errors.ResourceExhausted):
        violations = [(v.subject, v.description) for v in decoded.violations]
        retry_after = decoded.retry_after_seconds
    elif isinstance(decoded, errors.Unavailable):
        retry_after = decoded.retry_after_seconds
    return _BY_CODE.get(code, ApiError)(
        code,
        message,
        decoded.reason,
        metadata=decoded.metadata,
        violations=violations,
        retry_after=retry_after,
        request_id=_request_id(error),
    )
