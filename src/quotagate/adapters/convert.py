"""Core values to quotagate.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from quotagate.core.errors import InvalidRequest
from quotagate.core.model import Balance
from quotagate.v1 import usage_pb2


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


# Times outside these bounds are refused: far past or future dates only overflow date arithmetic downstream.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def datetime_of(message: Any, field: str) -> datetime | None:
    """The Timestamp field as an aware datetime, None when unset; InvalidRequest when it is not a usable time."""
    if not message.HasField(field):
        return None
    try:
        at: datetime = getattr(message, field).ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{field} is not a valid time") from None
    if not EARLIEST <= at < LATEST:
        raise InvalidRequest(f"{field} must lie between {EARLIEST.year} and {LATEST.year}")
    return at


def balance_message(balance: Balance) -> usage_pb2.Balance:
    return usage_pb2.Balance(
        user_id=balance.user_id,
        cycle=balance.cycle,
        state=balance.state.value,
        allowance=balance.allowance,
        allowance_used=balance.allowance_used,
        credits=balance.credits,
        reserved=balance.reserved,
        remaining=balance.remaining,
        used_percent=balance.used_percent,
        reset_at=timestamp(balance.resets_at),
    )
