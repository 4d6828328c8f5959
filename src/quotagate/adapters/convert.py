"""Core values to quotagate.v1 messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from quotagate.core.model import Balance
from quotagate.v1 import usage_pb2


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


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
