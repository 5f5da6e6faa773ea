"""``google.protobuf.Timestamp`` <-> aware UTC ``datetime``, for every servicer alike."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """The message of ``value`` (None stays None: the field is left unset)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)
