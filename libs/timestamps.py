"""``google.protobuf.Timestamp`` <-> aware UTC ``datetime``, for every servicer alike."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from corral.libs.errors import FieldViolation, InvalidArgument

# What a Timestamp may hold (google/protobuf/timestamp.proto): 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z, nanos 0..999,999,999.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799
MAX_NANOS = 999_999_999


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """The message of ``value`` (None stays None: the field is left unset)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp, field_path: str) -> datetime:
    """The UTC time of a caller's ``stamp``; INVALID_ARGUMENT naming ``field_path`` if it is
    outside what a Timestamp may hold (0001-01-01..9999-12-31, nanos 0..999,999,999)."""
    if not (MIN_SECONDS <= stamp.seconds <= MAX_SECONDS and 0 <= stamp.nanos <= MAX_NANOS):
        raise InvalidArgument(
            f"{field_path} is not a valid timestamp",
            violations=[
                FieldViolation(
                    field_path,
                    "must be between 0001-01-01 and 9999-12-31 UTC, nanos 0 to 999,999,999",
                )
            ],
        )
    return stamp.ToDatetime(tzinfo=UTC)
