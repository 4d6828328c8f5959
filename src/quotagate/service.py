"""The application layer: Check, usage settlement and balance changes, over the two stores.

No grpc or protobuf here: adapters/ translate the wire formats and call these methods.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from quotagate.config import Client, Settings, sha256_hex
from quotagate.core.clock import Clock
from quotagate.core.cycles import Cycle, cycle_at
from quotagate.core.decide import Decision, Verdict
from quotagate.core.errors import InvalidRequest, NotFound, StoreUnavailable
from quotagate.core.estimate import CompletionRequest, estimate_cost
from quotagate.core.model import (
    AccountLimits,
    AccountStatus,
    Balance,
    LedgerSnapshot,
    ModelWeight,
    QuotaState,
    Reservation,
)
from quotagate.core.weights import weight_for, weighted_cost
from quotagate.metrics import Metrics
from quotagate.store.ports import (
    AccountChanges,
    AccountRecord,
    Adjustment,
    ClientKeyRecord,
    ClientKeyStore,
    HotState,
    HotView,
    Ledger,
    LedgerQueries,
    NewAccount,
    NewGrant,
    SettleOutcome,
    UsageRecord,
    UsageTotals,
)

log = logging.getLogger("quotagate.service")

# Token counts above this are refused as absurd rather than charged.
MAX_REPORTED_TOKENS = 1_000_000_000
MAX_ID_CHARS = 256
MAX_GRANT = 1_000_000_000_000
MIN_REASON_CHARS = 3
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
GROUPINGS = ("none", "day", "model")
CLIENT_KEY_PREFIX = "qg_"
EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_BATCH_ROWS = 1000
EXPORT_FIELDS = (
    "request_id", "user_id", "model", "prompt_tokens", "completion_tokens", "cost", "cycle", "status", "estimated",
    "source", "occurred_at", "recorded_at",
)  # fmt: skip


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequest("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def require_reason(reason: str, what: str) -> str:
    reason = reason.strip()
    if len(reason) < MIN_REASON_CHARS:
        raise InvalidRequest(f"reason is required: say why {what}")
    return reason


def cycle_bounds(key: str, tz: ZoneInfo) -> Cycle:
    """The cycle named "YYYY-MM" in the configured timezone."""
    year, _, month = key.partition("-")
    if len(year) != 4 or len(month) != 2 or not (year + month).isdigit() or not 1 <= int(month) <= 12:
        raise InvalidRequest(f"cycle must look like 2026-11, not {key!r}")
    return cycle_at(datetime(int(year), int(month), 15, 12, tzinfo=tz), tz)


@dataclass(frozen=True)
class UsageReport:
    request_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    succeeded: bool = True
    occurred_at: datetime | None = None
    estimated: bool = False
    source: str = ""


def validate_id(kind: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidRequest(f"{kind} is required")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidRequest(f"{kind} must be at most {MAX_ID_CHARS} printable characters")
    return value


class QuotaService:
    def __init__(self, settings: Settings, ledger: Ledger, hot: HotState, clock: Clock, metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.hot = hot
        self.clock = clock
        self.metrics = metrics
        # user -> plan id, so Check weighs its estimate without a second store round trip. A stale entry
        # only skews one estimate; the charge uses the plan the ledger knows.
        self._plan_of: OrderedDict[str, str] = OrderedDict()
        # Users whose ledger changed while Redis could not be told; refresh_stale() catches them up.
        self._stale: set[str] = set()
        self._current_cycle: Cycle | None = None
        # SHA-256 -> client, for the active keys stored in the database: Check reads this map, never the
        # database. Refreshed at startup, after each create/revoke here, and periodically by the sweeper.
        self._db_clients: dict[str, Client] = {}
        # Told after a key is created or revoked here, so other processes reload theirs (keywatch.py).
        self.on_client_keys_changed: Callable[[], Awaitable[None]] | None = None

    # -- client keys ----------------------------------------------------------------------------------

    def client_by_key(self, key: str) -> Client | None:
        """The configured client, else the database one, with this bearer key (no I/O)."""
        digest = sha256_hex(key)
        for client in self.settings.clients:
            if client.key_sha256 == digest:
                return client
        return self._db_clients.get(digest)

    def key_store(self) -> ClientKeyStore:
        if not isinstance(self.ledger, ClientKeyStore):
            raise InvalidRequest("this ledger does not keep client keys")
        return self.ledger

    async def refresh_client_keys(self) -> int:
        """Reloads the active database keys into the in-process cache; returns how many there are."""
        if not isinstance(self.ledger, ClientKeyStore):
            return 0
        keys = await self.ledger.client_keys(include_revoked=False)
        self._db_clients = {
            k.key_sha256: Client(name=k.name, key_sha256=k.key_sha256, trusted=k.trusted, user_id=k.user_id)
            for k in keys
        }
        return len(keys)

    async def create_client_key(
        self, name: str, trusted: bool, user_id: str, reason: str, actor: str
    ) -> tuple[str, ClientKeyRecord]:
        """A new random client key: the secret (shown once) and the stored record (its digest only)."""
        name = validate_id("name", name)
        user_id = user_id.strip()
        if trusted and user_id:
            raise InvalidRequest("a trusted key asserts users with x-user-id; give trusted or user_id, not both")
        if not trusted:
            user_id = validate_id("user_id (an untrusted key acts for one user)", user_id)
        if any(c.name == name for c in self.settings.clients):
            raise InvalidRequest(f"a configured client is named {name!r}")
        secret = CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ClientKeyRecord(
            name=name,
            key_sha256=sha256_hex(secret),
            trusted=trusted,
            user_id=user_id or None,
            created_at=self.clock.now(),
            created_by=actor,
        )
        created = await self.key_store().create_client_key(record, reason.strip())
        await self._client_keys_changed()
        return secret, created

    async def revoke_client_key(self, name: str, reason: str, actor: str) -> ClientKeyRecord:
        name = validate_id("name", name)
        reason = require_reason(reason, "the key is revoked")
        revoked = await self.key_store().revoke_client_key(name, reason, actor)
        await self._client_keys_changed()
        return revoked

    async def _client_keys_changed(self) -> None:
        await self.refresh_client_keys()
        if self.on_client_keys_changed is None:
            return
        try:
            await self.on_client_keys_changed()
        except Exception as exc:  # the change is committed; other processes still catch up at their next sweep
            log.warning("could not announce the client key change: %s", exc)

    # -- pure helpers -------------------------------------------------------------------------------

    def cycle(self, now: datetime) -> Cycle:
        # The current cycle is remembered: nearly every call falls inside it, and this runs on every Check.
        current = self._current_cycle
        if current is not None and current.starts_at <= now < current.resets_at:
            return current
        cycle = cycle_at(now, self.settings.timezone)
        self._current_cycle = cycle
        return cycle

    def limits_of(self, account: AccountRecord) -> AccountLimits:
        plan = self.settings.plan(account.plan_id)
        return AccountLimits(
            status=account.status,
            plan_id=plan.id,
            allowance=account.allowance_override if account.allowance_override is not None else plan.monthly_allowance,
            warn_threshold=account.warn_threshold or plan.warn_threshold,
            critical_threshold=account.critical_threshold or plan.critical_threshold,
        )

    def weight(self, plan_id: str, model: str) -> ModelWeight:
        try:
            plan_weights = self.settings.plan(plan_id).weights
        except KeyError:
            plan_weights = ()
        return weight_for(model, plan_weights, self.settings.model_weights)

    def estimate(self, user_id: str, request: CompletionRequest) -> int:
        plan_id = self._plan_of.get(user_id, self.settings.default_plan)
        return estimate_cost(request, self.weight(plan_id, request.model), self.settings.estimate)

    def _remember_plan(self, user_id: str, plan_id: str) -> None:
        self._plan_of[user_id] = plan_id
        self._plan_of.move_to_end(user_id)
        if len(self._plan_of) > 100_000:
            self._plan_of.popitem(last=False)

    # -- Check ----------------------------------------------------------------------------------------

    async def check(self, user: NewAccount, request_id: str, request: CompletionRequest | None) -> Decision:
        now = self.clock.now()
        cycle = self.cycle(now)
        estimate = self.estimate(user.user_id, request) if request else 0
        reservation = Reservation(
            request_id=request_id,
            user_id=user.user_id,
            cycle=cycle.key,
            estimate=estimate,
            model=request.model if request else "",
            expires_at=now.timestamp() + self.settings.reservation_ttl_seconds,
        )
        for _ in range(3):
            result = await self.hot.reserve(
                user.user_id, cycle.key, reservation, self.settings.admission_mode, now.timestamp()
            )
            if result is not None:
                break
            await self.hot.load(await self._snapshot(user, cycle, now))
        else:
            raise RuntimeError(f"hot state for {user.user_id!r} could not be loaded")
        self._remember_plan(user.user_id, result.view.limits.plan_id)
        if result.admitted:
            verdict = Verdict.ALLOW
        elif result.view.limits.status is AccountStatus.SUSPENDED:
            verdict = Verdict.DENY_SUSPENDED
        else:
            verdict = Verdict.DENY_QUOTA
        balance = self._balance(user.user_id, cycle, result.view)
        return Decision(verdict, balance, estimate, reserved=result.admitted and estimate > 0)

    async def _snapshot(self, user: NewAccount, cycle: Cycle, now: datetime) -> LedgerSnapshot:
        try:
            return await self.ledger.snapshot(user.user_id, cycle.key, now)
        except NotFound:
            await self.ledger.ensure_account(user, self.settings.default_plan)
            log.info("account created", extra={"user_id": user.user_id})
            return await self.ledger.snapshot(user.user_id, cycle.key, now)

    @staticmethod
    def _balance(user_id: str, cycle: Cycle, view: HotView) -> Balance:
        return Balance(
            user_id=user_id,
            cycle=cycle.key,
            resets_at=cycle.resets_at,
            limits=view.limits,
            allowance_used=view.allowance_used,
            credits=view.credits,
            reserved=view.reserved,
        )

    # -- usage ----------------------------------------------------------------------------------------

    async def report_usage(self, report: UsageReport) -> tuple[SettleOutcome, Balance]:
        request_id = validate_id("request_id", report.request_id)
        for name, value in (
            ("prompt_tokens", report.prompt_tokens),
            ("completion_tokens", report.completion_tokens),
        ):
            if value < 0:
                raise InvalidRequest(f"{name} must not be negative")
            if value > MAX_REPORTED_TOKENS:
                raise InvalidRequest(f"{name} must be at most {MAX_REPORTED_TOKENS}")
        reservation = await self.hot.peek_reservation(request_id)
        if reservation is not None:
            if report.user_id and report.user_id != reservation.user_id:
                raise InvalidRequest(f"request_id {request_id!r} was reserved for another user than {report.user_id!r}")
            user_id = reservation.user_id
        else:
            user_id = validate_id("user_id (no reservation exists for this request_id)", report.user_id)
        now = self.clock.now()
        account = await self.ledger.get_account(user_id)
        if account is None:
            account = await self.ledger.ensure_account(NewAccount(user_id), self.settings.default_plan)
        model = report.model or (reservation.model if reservation else "")
        cost = weighted_cost(report.prompt_tokens, report.completion_tokens, self.weight(account.plan_id, model))
        usage = UsageRecord(
            request_id=request_id,
            user_id=user_id,
            model=model,
            prompt_tokens=report.prompt_tokens,
            completion_tokens=report.completion_tokens,
            cost=cost,
            occurred_at=report.occurred_at or now,
            estimated=report.estimated,
            source=report.source,
            succeeded=report.succeeded,
        )
        return await self._settle(usage, now)

    async def _settle(self, usage: UsageRecord, now: datetime) -> tuple[SettleOutcome, Balance]:
        cycle = self.cycle(now)
        outcome, snapshot = await self.ledger.record_usage(usage, cycle.key, now)
        try:
            await self.hot.settle(usage.request_id, snapshot)
        except StoreUnavailable as exc:
            # The charge is recorded; answering with an error would only invite a retry. The reservation
            # expires and is then settled as a duplicate (no second charge); the balance is refreshed later.
            self._mark_stale(snapshot.user_id, exc)
        if not outcome.charged:
            self.metrics.usage_reports.labels("duplicate" if usage.succeeded else "failed").inc()
        else:
            self.metrics.usage_reports.labels("charged").inc()
            self.metrics.tokens_charged.inc(outcome.cost)
        return outcome, await self._live_balance(snapshot, cycle, now)

    async def expire_due(self, limit: int = 200) -> int:
        """Charges reservations whose TTL passed unsettled at their estimate; returns how many."""
        now = self.clock.now()
        charged = 0
        for request_id in await self.hot.due_reservations(now.timestamp(), limit):
            reservation = await self.hot.peek_reservation(request_id)
            if reservation is None:
                await self.hot.settle(request_id, None)  # drops the stray index entry
                continue
            usage = UsageRecord(
                request_id=request_id,
                user_id=reservation.user_id,
                model=reservation.model,
                prompt_tokens=0,
                completion_tokens=0,
                cost=reservation.estimate,
                occurred_at=datetime.fromtimestamp(reservation.expires_at, now.tzinfo),
                estimated=True,
                source="expired",
            )
            outcome, _ = await self._settle(usage, now)
            if outcome.charged:
                charged += 1
                self.metrics.reservations_expired.inc()
                log.warning(
                    "reservation expired unsettled; charged its estimate",
                    extra={
                        "request_id": request_id,
                        "user_id": reservation.user_id,
                        "cost": reservation.estimate,
                    },
                )
        return charged

    # -- balances -------------------------------------------------------------------------------------

    async def _push(self, snapshot: LedgerSnapshot) -> None:
        """Tells the hot state about a committed ledger change; a change that cannot be told now is caught up
        by refresh_stale(), never reported as a failure (a retried grant would be granted twice)."""
        try:
            await self.hot.load(snapshot)
        except StoreUnavailable as exc:
            self._mark_stale(snapshot.user_id, exc)

    def _mark_stale(self, user_id: str, exc: Exception) -> None:
        self._stale.add(user_id)
        log.warning("hot state not updated; will refresh", extra={"user_id": user_id, "error": str(exc)})

    async def refresh_stale(self) -> int:
        """Reloads the hot state of users whose ledger changed while Redis was unreachable."""
        refreshed = 0
        now = self.clock.now()
        cycle = self.cycle(now)
        for user_id in list(self._stale):
            await self.hot.load(await self.ledger.snapshot(user_id, cycle.key, now))
            self._stale.discard(user_id)
            refreshed += 1
        return refreshed

    async def _live_balance(self, snapshot: LedgerSnapshot, cycle: Cycle, now: datetime) -> Balance:
        try:
            view = await self.hot.view(snapshot.user_id, cycle.key, now.timestamp())
        except StoreUnavailable:
            view = None  # the settled figures are the ledger's; only what is in flight is unknown
        reserved = view.reserved if view is not None else 0
        return Balance(
            user_id=snapshot.user_id,
            cycle=cycle.key,
            resets_at=cycle.resets_at,
            limits=snapshot.limits,
            allowance_used=snapshot.allowance_used,
            credits=snapshot.credits,
            reserved=reserved,
        )

    async def account(self, user_id: str) -> tuple[AccountRecord, Balance]:
        user_id = validate_id("user_id", user_id)
        account = await self.ledger.get_account(user_id)
        if account is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self.ledger.snapshot(user_id, cycle.key, now)
        return account, await self._live_balance(snapshot, cycle, now)

    async def grant(
        self,
        user_id: str,
        amount: int,
        reason: str,
        expires_at: datetime | None,
        source: str,
        actor: str,
    ) -> tuple[int, Balance]:
        user_id = validate_id("user_id", user_id)
        if amount <= 0 or amount > MAX_GRANT:
            raise InvalidRequest(f"amount must be between 1 and {MAX_GRANT}")
        if len(reason.strip()) < 3:
            raise InvalidRequest("reason is required: say why the credits are granted")
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        grant_id, snapshot = await self.ledger.grant(
            NewGrant(user_id, amount, reason.strip(), expires_at, source or "admin", actor), cycle.key, now
        )
        await self._push(snapshot)
        return grant_id, await self._live_balance(snapshot, cycle, now)

    async def upsert_account(self, user_id: str, changes: AccountChanges, reason: str, actor: str) -> Balance:
        user_id = validate_id("user_id", user_id)
        if len(reason.strip()) < 3:
            raise InvalidRequest("reason is required: say why the account changes")
        if changes.plan_id is not None and not any(p.id == changes.plan_id for p in self.settings.plans):
            raise InvalidRequest(f"no plan {changes.plan_id!r}; plans: {', '.join(p.id for p in self.settings.plans)}")
        if changes.allowance_override is not None and not 0 <= changes.allowance_override <= MAX_GRANT:
            raise InvalidRequest(f"allowance_override must be between 0 and {MAX_GRANT}")
        for name, value in (("email", changes.email), ("name", changes.name)):
            if value is not None and (len(value) > 320 or not value.isprintable()):
                raise InvalidRequest(f"{name} must be at most 320 printable characters")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self.ledger.upsert_account(
            user_id, changes, self.settings.default_plan, reason.strip(), actor, cycle.key, now
        )
        self._plan_of.pop(user_id, None)  # the next estimate uses the new plan's weights
        await self._push(snapshot)
        return await self._live_balance(snapshot, cycle, now)

    async def set_status(self, user_id: str, status: AccountStatus, reason: str, actor: str) -> Balance:
        user_id = validate_id("user_id", user_id)
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self.ledger.set_status(user_id, status, reason, actor, cycle.key, now)
        await self._push(snapshot)
        return await self._live_balance(snapshot, cycle, now)

    async def adjust(self, user_id: str, amount: int, reason: str, actor: str) -> tuple[int, Balance]:
        """Removes up to `amount` credit tokens; returns the tokens removed and the balance after."""
        user_id = validate_id("user_id", user_id)
        if amount <= 0 or amount > MAX_GRANT:
            raise InvalidRequest(f"amount must be between 1 and {MAX_GRANT}")
        reason = require_reason(reason, "the credits are removed")
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        removed, snapshot = await self.ledger.adjust(Adjustment(user_id, amount, reason, actor), cycle.key, now)
        await self._push(snapshot)
        return removed, await self._live_balance(snapshot, cycle, now)

    async def reset_cycle(self, user_id: str, reason: str, actor: str) -> Balance:
        """Zeroes the allowance used in the current cycle."""
        user_id = validate_id("user_id", user_id)
        reason = require_reason(reason, "the cycle is reset")
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self.ledger.reset_cycle(user_id, reason, actor, cycle.key, now)
        await self._push(snapshot)
        return await self._live_balance(snapshot, cycle, now)

    # -- admin queries ----------------------------------------------------------------------------------

    def queries(self) -> LedgerQueries:
        if not isinstance(self.ledger, LedgerQueries):
            raise InvalidRequest("this ledger does not answer admin queries")
        return self.ledger

    async def list_accounts(
        self, state: str, plan: str, query: str, size: int, after: str
    ) -> tuple[list[tuple[AccountRecord, Balance]], str]:
        """One page of accounts with live balances, and the user_id to continue after ("" on the last page).

        The state comes from the live balance (reservations included), so it is filtered here, reading the
        ledger in batches until the page is full."""
        states = {s.value for s in QuotaState}
        if state and state not in states:
            raise InvalidRequest(f"state must be one of {', '.join(sorted(states))}")
        size = page_size(size)
        queries = self.queries()
        now = self.clock.now()
        cycle = self.cycle(now)
        found: list[tuple[AccountRecord, Balance]] = []
        cursor = after
        while True:
            batch = await queries.list_accounts(cursor, max(size, 100), plan, query, cycle.key, now)
            for account, snapshot in batch.items:
                balance = await self._live_balance(snapshot, cycle, now)
                if not state or balance.state.value == state:
                    found.append((account, balance))
                    if len(found) > size:
                        return found[:size], found[size - 1][0].user_id
            if batch.exhausted or not batch.items:
                return found, ""
            cursor = batch.items[-1][0].user_id

    def time_range(self, cycle_key: str, start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
        """A cycle ("2026-11"), or start/end, or (neither) the current cycle, as [start, end)."""
        if cycle_key and (start or end):
            raise InvalidRequest("give either cycle or start/end, not both")
        if cycle_key:
            cycle = cycle_bounds(cycle_key, self.settings.timezone)
            start, end = cycle.starts_at, cycle.resets_at
        elif start is None and end is None:
            cycle = self.cycle(self.clock.now())
            start, end = cycle.starts_at, cycle.resets_at
        elif start is None or end is None:
            raise InvalidRequest("a date range needs both start and end")
        if start >= end:
            raise InvalidRequest("start must be before end")
        return start, end

    def export_usage(
        self, user_id: str, cycle_key: str, start: datetime | None, end: datetime | None, fmt: str
    ) -> AsyncIterator[bytes]:
        """Usage events as CSV (with a header row) or JSON lines, one chunk of whole lines per database batch.

        The arguments are checked here, before the first chunk, so a bad request fails as one error."""
        user_id = user_id.strip()
        if user_id:
            user_id = validate_id("user_id", user_id)
        fmt = fmt.strip().lower()
        if fmt not in EXPORT_FORMATS:
            raise InvalidRequest(f"format must be one of {', '.join(EXPORT_FORMATS)}")
        start, end = self.time_range(cycle_key, start, end)
        return self._export_chunks(self.queries(), user_id, start, end, fmt)

    @staticmethod
    async def _export_chunks(
        queries: LedgerQueries, user_id: str, start: datetime, end: datetime, fmt: str
    ) -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield _csv_lines([list(EXPORT_FIELDS)])
        async for batch in queries.export_usage(user_id, start, end, EXPORT_BATCH_ROWS):
            if fmt == "csv":
                yield _csv_lines([[_export_value(row[f]) for f in EXPORT_FIELDS] for row in batch])
            else:
                yield "".join(
                    json.dumps({f: _json_value(row[f]) for f in EXPORT_FIELDS}, ensure_ascii=False) + "\n"
                    for row in batch
                ).encode()

    async def usage(
        self, user_id: str, cycle_key: str, start: datetime | None, end: datetime | None, group_by: str
    ) -> tuple[datetime, datetime, list[UsageTotals]]:
        user_id = validate_id("user_id", user_id)
        group_by = group_by or "none"
        if group_by not in GROUPINGS:
            raise InvalidRequest(f"group_by must be one of {', '.join(GROUPINGS)}")
        start, end = self.time_range(cycle_key, start, end)
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        rows = await self.queries().usage_totals(user_id, start, end, group_by, self.settings.timezone.key)
        return start, end, rows


def _export_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _csv_lines(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()
