"""The one table from error categories to gRPC codes, and their rich ``google.rpc.Status``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from corral.libs import errors

CODE_FOR: dict[type[errors.CorralError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def code_for(error: errors.CorralError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODE_FOR:
            return CODE_FOR[cls]
    return grpc.StatusCode.UNKNOWN


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: errors.CorralError) -> grpc.Status:
    """Build the status a client decodes with ``grpc_status.rpc_status.from_call``."""
    code = code_for(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, errors.InvalidArgument) and error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, errors.ResourceExhausted) and error.violations:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=v.subject, description=f"{v.limit}: {v.description}"
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    retry_after = (
        error.retry_after_seconds
        if isinstance(error, errors.ResourceExhausted | errors.Unavailable)
        else None
    )
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status() -> grpc.Status:
    """What an unexpected exception becomes: no stack, no message from inside."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=errors.ERROR_DOMAIN))],
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def from_rpc_error(error: grpc.aio.AioRpcError) -> errors.CorralError:
    """Turn another service's error back into the category it came from, keeping its reason,
    metadata and details, so a caller of this service sees what the dependency said."""
    code = error.code()
    category: type[errors.CorralError] = errors.Unavailable
    for cls, mapped in CODE_FOR.items():
        if mapped == code:
            category = cls
            break
    message = error.details() or code.name
    reason, metadata = code.name, {}
    violations: list[errors.FieldViolation] = []
    quota: list[errors.QuotaViolation] = []
    retry_after: float | None = None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [
                errors.FieldViolation(v.field, v.description) for v in bad.field_violations
            ]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota = [
                errors.QuotaViolation(v.subject, v.description.partition(":")[0], v.description)
                for v in failure.violations
            ]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    if category is errors.InvalidArgument:
        return errors.InvalidArgument(
            message, violations=violations, reason=reason, metadata=metadata
        )
    if category is errors.ResourceExhausted:
        return errors.ResourceExhausted(
            message,
            violations=quota,
            retry_after_seconds=retry_after,
            reason=reason,
            metadata=metadata,
        )
    if category is errors.Unavailable and code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(
            message, retry_after_seconds=retry_after, reason=reason, metadata=metadata
        )
    if code == grpc.StatusCode.INTERNAL or code == grpc.StatusCode.UNKNOWN:
        return errors.Unavailable("a dependency failed", reason="DEPENDENCY_FAILED")
    return category(message, reason=reason, metadata=metadata)


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """Around a call to another service: a failed call raises what the callee meant, as the
    category :func:`from_rpc_error` reads from it (adapters use it so that their service layer
    never sees gRPC)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
