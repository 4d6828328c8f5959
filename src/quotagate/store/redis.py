"""The hot state in Redis: each account's cached ledger snapshot plus the reservations in flight.

Every change is one Lua script (store/lua), so concurrent Checks in any number of processes see one order.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from quotagate.core.errors import StoreUnavailable
from quotagate.core.model import (
    AccountLimits,
    AccountStatus,
    AdmissionMode,
    LedgerSnapshot,
    Reservation,
)
from quotagate.store.ports import HotView, ReserveResult
from quotagate.store.resp import PipelinedRedis, Script

# A balance hash outlives its cycle by far, so it is there for the whole month.
BALANCE_TTL_MS = 40 * 24 * 3600 * 1000
# The sweeper charges an expired reservation from its hash; keep the hash well past the expiry.
RESERVATION_GRACE_MS = 24 * 3600 * 1000


def _script(name: str) -> str:
    return resources.files("quotagate.store").joinpath("lua", name).read_text(encoding="utf-8")


def snapshot_fields(snapshot: LedgerSnapshot) -> list[str | int | float]:
    limits = snapshot.limits
    expiry = snapshot.next_credit_expiry.timestamp() if snapshot.next_credit_expiry else 0
    return [
        "status", limits.status.value,
        "plan", limits.plan_id,
        "allowance", limits.allowance,
        "warn", repr(limits.warn_threshold),
        "critical", repr(limits.critical_threshold),
        "used", snapshot.allowance_used,
        "credits", snapshot.credits,
        "next_expiry", repr(expiry),
    ]  # fmt: skip


def _view(values: list[Any], settling: int = 0) -> HotView:
    # values: status, allowance, used, credits, reserved, warn, critical, plan
    return HotView(
        limits=AccountLimits(
            status=AccountStatus(values[0]),
            plan_id=values[7],
            allowance=int(values[1]),
            warn_threshold=float(values[5]),
            critical_threshold=float(values[6]),
        ),
        allowance_used=int(values[2]) + settling,
        credits=int(values[3]),
        reserved=max(0, int(values[4] or 0)),
        settling=settling,
    )


class RedisHotState:
    def __init__(self, client: aioredis.Redis, prefix: str = "qg:", fast: PipelinedRedis | None = None) -> None:
        self._r = client
        self._prefix = prefix
        self._due = f"{prefix}res:due"
        # Check's script goes over the pipelined connection; the rarer calls use redis-py.
        self._fast = fast
        self._reserve_script = Script(_script("reserve.lua"))
        self._reserve = client.register_script(self._reserve_script.source)
        self._load = client.register_script(_script("load.lua"))
        # Every request also settles: those scripts and reads take the pipelined connection too.
        self._settle = Script(_script("settle.lua"))
        self._settling = Script(_script("settling.lua"))
        self._forwarded = Script(_script("forwarded.lua"))

    @classmethod
    def from_url(cls, url: str, prefix: str = "qg:") -> RedisHotState:
        client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2, max_connections=256
        )
        return cls(client, prefix, PipelinedRedis(url))

    @property
    def client(self) -> aioredis.Redis:
        return self._r

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        await self._r.aclose()

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def _balance_key(self, user_id: str, cycle: str) -> str:
        return f"{self._prefix}bal:{user_id}:{cycle}"

    def _reservation_key(self, request_id: str) -> str:
        return f"{self._prefix}res:{request_id}"

    async def reserve(
        self, user_id: str, cycle: str, reservation: Reservation, mode: AdmissionMode, now: float
    ) -> ReserveResult | None:
        ttl_ms = int(max(0.0, reservation.expires_at - now) * 1000) + RESERVATION_GRACE_MS
        keys = [self._balance_key(user_id, cycle), self._reservation_key(reservation.request_id), self._due]
        args = [
            reservation.estimate,
            1 if mode is AdmissionMode.STRICT else 0,
            repr(now),
            repr(reservation.expires_at),
            reservation.request_id,
            user_id,
            cycle,
            reservation.model,
            ttl_ms,
        ]
        if self._fast is not None:
            out = await self._fast.evalsha(self._reserve_script, keys, args)
        else:
            try:
                out = await self._reserve(keys=keys, args=args)
            except RedisError as exc:
                raise StoreUnavailable(f"redis: {exc}") from exc
        verdict = out[0]
        if verdict in ("missing", "stale"):
            return None
        view = _view(out[1:])
        if verdict == "dup":
            return ReserveResult(admitted=False, view=view, duplicate=True)
        return ReserveResult(admitted=verdict == "ok", view=view)

    async def view(self, user_id: str, cycle: str, now: float) -> HotView | None:
        fields = ["status", "allowance", "used", "credits", "reserved", "warn", "critical", "plan", "next_expiry"]
        values = await self._hmget(self._balance_key(user_id, cycle), [*fields, "settling"])
        if values[0] is None:
            return None
        expiry = float(values[8] or 0)
        if expiry and now >= expiry:
            return None
        return _view(values[:8], max(0, int(values[9] or 0)))

    async def load(self, snapshot: LedgerSnapshot) -> None:
        try:
            await self._load(
                keys=[self._balance_key(snapshot.user_id, snapshot.cycle)],
                args=[snapshot.version, BALANCE_TTL_MS, *snapshot_fields(snapshot)],
            )
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def _eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        if self._fast is not None:
            return await self._fast.evalsha(script, keys, args)
        try:
            return await self._r.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            try:
                return await self._r.eval(script.source, len(keys), *keys, *args)
            except RedisError as exc:
                raise StoreUnavailable(f"redis: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def _hmget(self, key: str, fields: list[str]) -> list[Any]:
        if self._fast is not None:
            reply = await self._fast.execute("HMGET", key, *fields)
            if isinstance(reply, hiredis.ReplyError):
                raise StoreUnavailable(f"redis: HMGET failed: {reply}")
            return list(reply)
        try:
            return list(await self._r.hmget(key, fields))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def peek_reservation(self, request_id: str) -> Reservation | None:
        values = await self._hmget(
            self._reservation_key(request_id), ["user", "cycle", "estimate", "model", "expires_at", "plan", "fwd"]
        )
        return _reservation(request_id, values)

    async def mark_forwarded(self, request_id: str) -> bool:
        return bool(await self._eval(self._forwarded, [self._reservation_key(request_id)], []))

    async def mark_settling(self, request_id: str, cost: int) -> bool:
        out = await self._eval(self._settling, [self._reservation_key(request_id)], [f"{self._prefix}bal:", cost])
        return bool(out)

    async def settle(self, request_id: str, snapshot: LedgerSnapshot | None) -> Reservation | None:
        balance_key = self._balance_key(snapshot.user_id, snapshot.cycle) if snapshot else self._due
        args: list[str | int | float] = [request_id, f"{self._prefix}bal:"]
        if snapshot is None:
            args += ["", 0]
        else:
            args += [snapshot.version, BALANCE_TTL_MS, *snapshot_fields(snapshot)]
        out = await self._eval(self._settle, [self._reservation_key(request_id), self._due, balance_key], args)
        return _reservation(request_id, out) if out else None

    async def due_reservations(self, now: float, limit: int) -> list[str]:
        try:
            members = await self._r.zrangebyscore(self._due, "-inf", repr(now), start=0, num=limit)
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [str(m) for m in members]

    async def forget(self, user_id: str, cycle: str) -> None:
        try:
            await self._r.delete(self._balance_key(user_id, cycle))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


def _reservation(request_id: str, values: list[Any]) -> Reservation | None:
    if not values or values[0] is None:
        return None
    return Reservation(
        request_id=request_id,
        user_id=values[0],
        cycle=values[1],
        estimate=int(values[2]),
        model=values[3] or "",
        expires_at=float(values[4]),
        plan_id=(values[5] or "") if len(values) > 5 else "",
        forwarded=len(values) > 6 and values[6] == "1",
    )
