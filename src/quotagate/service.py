"""The application layer: Check, usage settlement and balance changes, over the two stores.

No grpc or protobuf here: adapters/ translate the wire formats and call these methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec, TypeVar
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
    Plan,
    QuotaState,
    Reservation,
)
from quotagate.core.plans import PlanChanges, validate_plan
from quotagate.core.weights import weight_for, weighted_cost
from quotagate.links import LinkSigner, UserLinks
from quotagate.metrics import Metrics
from quotagate.outbox import OutboxItem, UsageOutbox
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
    PlanRecord,
    PlanStore,
    SettleOutcome,
    UsageRecord,
    UsageTotals,
)

log = logging.getLogger("quotagate.service")

# Token counts above this are refused as absurd rather than charged.
MAX_REPORTED_TOKENS = 1_000_000_000
MAX_ID_CHARS = 256
MAX_GRANT = 1_000_000_000_000
# A reason is read later by someone who was not there: ask for a sentence, not a word.
MIN_REASON_WORDS = 3
MIN_REASON_CHARS = 15
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
GROUPINGS = ("none", "day", "model")
CLIENT_KEY_PREFIX = "qg_"
EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_BATCH_ROWS = 1000
# After a plan change its accounts' hot state is rewritten in batches read from the ledger, this many at a time.
PLAN_RELOAD_BATCH = 500
PLAN_RELOAD_CONCURRENCY = 50
# The outbox drains in batches of this many records, this many ledger transactions at a time.
OUTBOX_BATCH = 500
OUTBOX_CONCURRENCY = 4
EXPORT_FIELDS = (
    "request_id", "user_id", "model", "prompt_tokens", "completion_tokens", "cost", "cycle", "status", "estimated",
    "source", "occurred_at", "recorded_at",
)  # fmt: skip


P = ParamSpec("P")
R = TypeVar("R")


class UnknownPlan(KeyError):
    """An account's plan is not in this process's copy of the plans (created elsewhere since the last reload)."""


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequest("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def require_reason(reason: str, what: str) -> str:
    """The trimmed reason, if it is a sentence: at least MIN_REASON_WORDS words and MIN_REASON_CHARS characters."""
    reason = reason.strip()
    if len(reason.split()) < MIN_REASON_WORDS or len(reason) < MIN_REASON_CHARS:
        raise InvalidRequest(
            f"reason must be a sentence saying why {what} (at least {MIN_REASON_WORDS} words and "
            f"{MIN_REASON_CHARS} characters), e.g. 'Paid by bank transfer, ticket 1234.'"
        )
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
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        hot: HotState,
        clock: Clock,
        metrics: Metrics,
        outbox: UsageOutbox | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.hot = hot
        self.clock = clock
        self.metrics = metrics
        # Where settled usage waits while PostgreSQL is away; None: such a settlement fails (and the
        # reservation is charged at its estimate when it expires).
        self.outbox = outbox
        # user -> plan id, so Check weighs its estimate without a second store round trip. A stale entry
        # only skews one estimate; the charge uses the plan the ledger knows.
        self._plan_of: OrderedDict[str, str] = OrderedDict()
        # Users whose ledger changed while Redis could not be told; refresh_stale() catches them up.
        self._stale: set[str] = set()
        self._current_cycle: Cycle | None = None
        # SHA-256 -> client, for the active keys stored in the database: Check reads this map, never the
        # database. Refreshed at startup, after each create/revoke here, and periodically by the sweeper.
        self._db_clients: dict[str, Client] = {}
        self.links = UserLinks(
            LinkSigner(settings.link_secret.encode(), settings.public_url),
            checkout=settings.stripe.enabled,
            manual=settings.purchase_hint,
        )
        # id -> plan. The database is the record of plans (the config only seeds missing ones); this copy is
        # reloaded at startup, after each change made here, and periodically by the sweeper (other processes).
        self._plans: dict[str, Plan] = {p.id: p for p in settings.plans}
        self._plans_loaded = False
        # Changed plans whose accounts' hot state is still to be rewritten (see refresh_plans).
        self._plans_to_reload: set[str] = set()
        self._plan_reload_lock = asyncio.Lock()
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

    def plan(self, plan_id: str) -> Plan:
        """The plan from the in-process copy; UnknownPlan when this process has not loaded it yet."""
        plan = self._plans.get(plan_id)
        if plan is None:
            raise UnknownPlan(plan_id)
        return plan

    def limits_of(self, account: AccountRecord) -> AccountLimits:
        plan = self.plan(account.plan_id)
        return AccountLimits(
            status=account.status,
            plan_id=plan.id,
            allowance=account.allowance_override if account.allowance_override is not None else plan.monthly_allowance,
            warn_threshold=account.warn_threshold or plan.warn_threshold,
            critical_threshold=account.critical_threshold or plan.critical_threshold,
        )

    def weight(self, plan_id: str, model: str) -> ModelWeight:
        plan = self._plans.get(plan_id)
        plan_weights = plan.weights if plan is not None else ()
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
        if result.duplicate:
            # Envoy makes a new id per request: a repeated one is a client's, never a pass on another's hold.
            raise InvalidRequest(f"request id {request_id!r} is already in use by a request in flight")
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
            return await self._knowing_plans(self.ledger.snapshot, user.user_id, cycle.key, now)
        except NotFound:
            await self.ledger.ensure_account(user, self.settings.default_plan)
            log.info("account created", extra={"user_id": user.user_id})
            return await self._knowing_plans(self.ledger.snapshot, user.user_id, cycle.key, now)

    async def _knowing_plans(self, call: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs a ledger call; when it meets a plan created by another process since the last reload, reloads
        the plans and runs it once more (the failed call's transaction was rolled back)."""
        try:
            return await call(*args, **kwargs)
        except UnknownPlan:
            await self.refresh_plans()
            return await call(*args, **kwargs)

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

    async def report_usage(self, report: UsageReport, *, in_flight: bool = True) -> tuple[SettleOutcome, Balance]:
        """Settles a request's usage; returns the outcome and the balance after it. `in_flight=False` leaves
        out what other requests hold (one Redis read less), for callers that only need the settled figures."""
        request_id = validate_id("request_id", report.request_id)
        for name, value in (
            ("prompt_tokens", report.prompt_tokens),
            ("completion_tokens", report.completion_tokens),
        ):
            if value < 0:
                raise InvalidRequest(f"{name} must not be negative")
            if value > MAX_REPORTED_TOKENS:
                raise InvalidRequest(f"{name} must be at most {MAX_REPORTED_TOKENS}")
        try:
            reservation = await self.hot.peek_reservation(request_id)
        except StoreUnavailable as exc:
            # Redis is away: the ledger alone can still charge the usage, to the user the report names.
            log.warning("reservation not readable; settling by the reported user", extra={"error": str(exc)})
            reservation = None
        if reservation is not None:
            if report.user_id and report.user_id != reservation.user_id:
                raise InvalidRequest(f"request_id {request_id!r} was reserved for another user than {report.user_id!r}")
            user_id = reservation.user_id
        else:
            user_id = validate_id("user_id (no reservation exists for this request_id)", report.user_id)
        now = self.clock.now()
        model = report.model or (reservation.model if reservation else "")
        weight = self.weight(await self._plan_for_usage(user_id, reservation), model)
        cost = weighted_cost(report.prompt_tokens, report.completion_tokens, weight)
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
        return await self._settle(usage, now, in_flight)

    async def charge_ahead(self, request_id: str, cost: int) -> bool:
        """Counts a finished request's cost in the hot state ahead of its settlement, so that its answer need not
        wait for the ledger while every later decision already sees the charge; False when that cannot be done
        (the caller then settles first)."""
        try:
            return await self.hot.mark_settling(request_id, cost)
        except StoreUnavailable as exc:
            log.warning("charge not counted ahead: %s", exc, extra={"request_id": request_id})
            return False

    async def _plan_for_usage(self, user_id: str, reservation: Reservation | None) -> str:
        """The plan whose weights price a usage report: the one the reservation was placed under (no ledger read
        on the hot path), else the ledger's, else (PostgreSQL away) the one Check last saw for the user."""
        if reservation is not None and reservation.plan_id in self._plans:
            return reservation.plan_id
        try:
            account = await self.ledger.get_account(user_id)
            if account is None:
                account = await self.ledger.ensure_account(NewAccount(user_id), self.settings.default_plan)
            if account.plan_id not in self._plans:
                await self.refresh_plans()  # created by another process since the last reload: use its weights
        except StoreUnavailable:
            if self.outbox is None:
                raise
            return self._plan_of.get(user_id, self.settings.default_plan)
        return account.plan_id

    async def _settle(self, usage: UsageRecord, now: datetime, in_flight: bool = True) -> tuple[SettleOutcome, Balance]:
        cycle = self.cycle(now)
        try:
            outcome, snapshot = await self._knowing_plans(self.ledger.record_usage, usage, cycle.key, now)
        except StoreUnavailable as exc:
            if self.outbox is None:
                raise
            return await self._queue_usage(self.outbox, usage, cycle, now, exc)
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
        if not in_flight:
            return outcome, self._settled_balance(snapshot, cycle, 0)
        return outcome, await self._live_balance(snapshot, cycle, now)

    async def _queue_usage(
        self, outbox: UsageOutbox, usage: UsageRecord, cycle: Cycle, now: datetime, error: StoreUnavailable
    ) -> tuple[SettleOutcome, Balance]:
        item = OutboxItem(usage, cycle.key)
        queued = await outbox.queue(item)  # Redis away too: StoreUnavailable, and the reservation stays
        self.metrics.usage_reports.labels("queued" if queued else "duplicate").inc()
        log.warning(
            "ledger unavailable; usage kept in the outbox" if queued else "usage already in the outbox",
            extra={"request_id": usage.request_id, "user_id": usage.user_id, "cost": item.held, "error": str(error)},
        )
        view = await self.hot.view(usage.user_id, cycle.key, now.timestamp())
        if view is None:
            # Kept, but this account's figures are not in Redis: there is no balance to answer with.
            raise StoreUnavailable(f"usage kept in the outbox; the balance is known again with the ledger: {error}")
        return SettleOutcome(charged=queued and usage.succeeded, cost=item.held, user_id=usage.user_id), (
            self._balance(usage.user_id, cycle, view)
        )

    async def drain_outbox(self, batch: int = OUTBOX_BATCH) -> int:
        """Writes outbox records to the ledger, oldest first, a few at a time, until the outbox is empty; returns
        how many left the outbox. A PostgreSQL failure ends the round (the rest waits for the next one)."""
        if self.outbox is None:
            return 0
        outbox = self.outbox
        gate = asyncio.Semaphore(OUTBOX_CONCURRENCY)  # leaves the pool's other connections to traffic
        failures: list[StoreUnavailable] = []

        async def write(item: OutboxItem) -> bool:
            async with gate:
                if failures:
                    return False  # PostgreSQL went away: the rest waits for the next round
                try:
                    return await self._write_outbox_item(outbox, item)
                except StoreUnavailable as exc:
                    failures.append(exc)
                    return False

        written = 0
        try:
            while True:
                self.metrics.outbox_records.set(await outbox.size())
                items = await outbox.oldest(batch)
                done = sum(await asyncio.gather(*(write(item) for item in items)))
                written += done
                if failures:
                    raise failures[0]
                if len(items) < batch or done == 0:
                    return written
        finally:
            with contextlib.suppress(StoreUnavailable):
                self.metrics.outbox_records.set(await outbox.size())

    async def _write_outbox_item(self, outbox: UsageOutbox, item: OutboxItem) -> bool:
        now = self.clock.now()
        try:
            try:
                outcome, snapshot = await self.ledger.record_usage(item.usage, item.cycle, now)
            except NotFound:
                # Settled for a user the ledger has not seen (created while PostgreSQL was away).
                await self.ledger.ensure_account(NewAccount(item.usage.user_id), self.settings.default_plan)
                outcome, snapshot = await self.ledger.record_usage(item.usage, item.cycle, now)
        except StoreUnavailable:
            raise
        except Exception:
            # One record the ledger refuses must not hold back the others; it stays and is retried.
            log.exception("outbox usage not written", extra={"request_id": item.usage.request_id})
            return False
        if not await outbox.done(item, snapshot):
            return False  # another process finished it first
        if outcome.charged:
            self.metrics.tokens_charged.inc(outcome.cost)
        log.info(
            "outbox usage written to the ledger",
            extra={
                "request_id": item.usage.request_id,
                "user_id": item.usage.user_id,
                "cost": outcome.cost,
                "charged": outcome.charged,
            },
        )
        return True

    async def expire_due(self, limit: int = 200) -> int:
        """Settles reservations whose TTL passed unsettled: at their estimate when their request went to the
        upstream (or quotagate cannot tell, usage_capture: callback), at nothing when it never left Envoy. Returns
        how many were charged."""
        now = self.clock.now()
        charged = 0
        for request_id in await self.hot.due_reservations(now.timestamp(), limit):
            reservation = await self.hot.peek_reservation(request_id)
            if reservation is None:
                await self.hot.settle(request_id, None)  # drops the stray index entry
                continue
            if not reservation.forwarded and self.settings.usage_capture == "ext_proc":
                await self._release_unforwarded(reservation, now)
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

    async def _release_unforwarded(self, reservation: Reservation, now: datetime) -> None:
        """Releases the hold of a request that Envoy never sent on (Check timed out, the client reset): nothing
        was served, so nothing is charged; the ledger keeps a row at 0 saying so."""
        usage = UsageRecord(
            request_id=reservation.request_id,
            user_id=reservation.user_id,
            model=reservation.model,
            prompt_tokens=0,
            completion_tokens=0,
            cost=0,
            occurred_at=datetime.fromtimestamp(reservation.expires_at, now.tzinfo),
            source="unforwarded",
            succeeded=False,
        )
        await self._settle(usage, now)
        self.metrics.reservations_released.inc()
        log.info(
            "reservation expired; its request never reached the upstream, released",
            extra={"request_id": reservation.request_id, "user_id": reservation.user_id},
        )

    async def mark_forwarded(self, request_id: str) -> None:
        """Notes that Envoy sent the request on after Check (see expire_due). A failure is only logged: the hold
        is then charged at its estimate if it expires, as without ext_proc."""
        try:
            await self.hot.mark_forwarded(request_id)
        except StoreUnavailable as exc:
            log.warning("request not marked as forwarded: %s", exc, extra={"request_id": request_id})

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
            await self.hot.load(await self._knowing_plans(self.ledger.snapshot, user_id, cycle.key, now))
            self._stale.discard(user_id)
            refreshed += 1
        return refreshed

    async def _live_balance(self, snapshot: LedgerSnapshot, cycle: Cycle, now: datetime) -> Balance:
        return self._settled_balance(snapshot, cycle, await self._held(snapshot.user_id, cycle, now))

    async def _held(self, user_id: str, cycle: Cycle, now: datetime) -> int:
        """What the hot state holds for the user: reservations, and costs settling (in flight to the ledger,
        so shown as held until the ledger has them)."""
        try:
            view = await self.hot.view(user_id, cycle.key, now.timestamp())
        except StoreUnavailable:
            return 0  # the settled figures are the ledger's; only what is in flight is unknown
        return view.reserved + view.settling if view is not None else 0

    @staticmethod
    def _settled_balance(snapshot: LedgerSnapshot, cycle: Cycle, reserved: int) -> Balance:
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
        # Holds before the ledger: a settlement landing in between is then counted twice for a moment (held and
        # used), never missed. Read the other way round, its cost could be in neither.
        held = await self._held(user_id, cycle, now)
        snapshot = await self._knowing_plans(self.ledger.snapshot, user_id, cycle.key, now)
        return account, self._settled_balance(snapshot, cycle, held)

    async def balance_of(self, user: NewAccount, *, create: bool) -> tuple[AccountRecord, Balance]:
        """The live balance; `create` makes a first-seen account as Check would (trusted identity only)."""
        if not create:
            return await self.account(user.user_id)
        now = self.clock.now()
        cycle = self.cycle(now)
        held = await self._held(user.user_id, cycle, now)  # before the ledger, as in account()
        snapshot = await self._snapshot(user, cycle, now)
        account = await self.ledger.get_account(user.user_id)
        if account is None:
            raise NotFound(f"no account {user.user_id!r}")
        return account, self._settled_balance(snapshot, cycle, held)

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
        reason = require_reason(reason, "the credits are granted")
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        grant_id, snapshot = await self._knowing_plans(
            self.ledger.grant,
            NewGrant(user_id, amount, reason.strip(), expires_at, source or "admin", actor),
            cycle.key,
            now,
        )
        await self._push(snapshot)
        return grant_id, await self._live_balance(snapshot, cycle, now)

    async def upsert_account(self, user_id: str, changes: AccountChanges, reason: str, actor: str) -> Balance:
        user_id = validate_id("user_id", user_id)
        reason = require_reason(reason, "the account changes")
        if changes.plan_id is not None:
            if changes.plan_id not in self._plans:
                await self.refresh_plans()  # it may have been created by another process a moment ago
            plan = self._plans.get(changes.plan_id)
            if plan is None:
                raise InvalidRequest(f"no plan {changes.plan_id!r}; plans: {', '.join(sorted(self._plans))}")
            if not plan.active:
                raise InvalidRequest(f"plan {plan.id!r} is inactive: it takes no new accounts")
        if changes.allowance_override is not None and not 0 <= changes.allowance_override <= MAX_GRANT:
            raise InvalidRequest(f"allowance_override must be between 0 and {MAX_GRANT}")
        for name, value in (("email", changes.email), ("name", changes.name)):
            if value is not None and (len(value) > 320 or not value.isprintable()):
                raise InvalidRequest(f"{name} must be at most 320 printable characters")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self._knowing_plans(
            self.ledger.upsert_account,
            user_id,
            changes,
            self.settings.default_plan,
            reason.strip(),
            actor,
            cycle.key,
            now,
        )
        self._plan_of.pop(user_id, None)  # the next estimate uses the new plan's weights
        await self._push(snapshot)
        return await self._live_balance(snapshot, cycle, now)

    async def set_status(self, user_id: str, status: AccountStatus, reason: str, actor: str) -> Balance:
        user_id = validate_id("user_id", user_id)
        reason = require_reason(reason, "the account's status changes")
        if await self.ledger.get_account(user_id) is None:
            raise NotFound(f"no account {user_id!r}")
        now = self.clock.now()
        cycle = self.cycle(now)
        snapshot = await self._knowing_plans(self.ledger.set_status, user_id, status, reason, actor, cycle.key, now)
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
        adjustment = Adjustment(user_id, amount, reason, actor)
        removed, snapshot = await self._knowing_plans(self.ledger.adjust, adjustment, cycle.key, now)
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
        snapshot = await self._knowing_plans(self.ledger.reset_cycle, user_id, reason, actor, cycle.key, now)
        await self._push(snapshot)
        return await self._live_balance(snapshot, cycle, now)

    # -- plans ----------------------------------------------------------------------------------------------

    def plan_store(self) -> PlanStore:
        if not isinstance(self.ledger, PlanStore):
            raise InvalidRequest("this ledger does not keep plans")
        return self.ledger

    async def refresh_plans(self) -> list[str]:
        """Reloads the plans from the database; returns the ids of those that changed since the last load.

        The hot state of the accounts on a changed plan holds the old allowance and thresholds, so it is
        reloaded here: their next decision uses the new values. Every process does this when it sees the
        change, so one that wrote old values in the meantime puts them right. A reload that did not finish
        (a store error, a cancelled call) is taken up again by the next refresh."""
        if not isinstance(self.ledger, PlanStore):
            return []
        fresh = {r.plan.id: r.plan for r in await self.ledger.plans()}
        # The first load replaces the config's copy; the hot state was put right by whoever changed a plan.
        loaded, self._plans_loaded = self._plans_loaded, True
        changed = [plan_id for plan_id, plan in fresh.items() if loaded and self._plans.get(plan_id, plan) != plan]
        self._plans = fresh
        self._plans_to_reload.update(changed)
        # Shielded: an admin call that gives up waiting must not leave the reload half done.
        await asyncio.shield(self._reload_pending_plans())
        return changed

    async def _reload_pending_plans(self) -> None:
        async with self._plan_reload_lock:
            for plan_id in sorted(self._plans_to_reload):
                await self._reload_accounts_of(plan_id)
                self._plans_to_reload.discard(plan_id)

    async def _reload_accounts_of(self, plan_id: str) -> None:
        """Rewrites the hot state of the plan's accounts that have one in this cycle (keeping what is reserved)."""
        if not isinstance(self.ledger, LedgerQueries):
            return
        now = self.clock.now()
        cycle = self.cycle(now)

        async def reload(user_id: str, snapshot: LedgerSnapshot) -> None:
            try:
                present = await self.hot.view(user_id, cycle.key, now.timestamp()) is not None
            except StoreUnavailable as exc:
                self._mark_stale(user_id, exc)
                return
            if present:
                await self._push(snapshot)

        after = ""
        while True:
            batch = await self.ledger.list_accounts(after, PLAN_RELOAD_BATCH, plan_id, "", cycle.key, now)
            for start in range(0, len(batch.items), PLAN_RELOAD_CONCURRENCY):
                group = batch.items[start : start + PLAN_RELOAD_CONCURRENCY]
                await asyncio.gather(*(reload(account.user_id, snapshot) for account, snapshot in group))
            if batch.exhausted or not batch.items:
                return
            after = batch.items[-1][0].user_id

    async def list_plans(self, active_only: bool) -> list[PlanRecord]:
        return [r for r in await self.plan_store().plans(count_accounts=True) if r.plan.active or not active_only]

    async def get_plan(self, plan_id: str) -> PlanRecord:
        plan_id = validate_id("id", plan_id)
        for record in await self.plan_store().plans(count_accounts=True):
            if record.plan.id == plan_id:
                return record
        raise NotFound(f"no plan {plan_id!r}")

    async def create_plan(self, plan: Plan, reason: str, actor: str) -> PlanRecord:
        reason = require_reason(reason, "the plan is created")
        record = await self.plan_store().create_plan(validate_plan(plan), reason, actor)
        await self.refresh_plans()
        return record

    async def update_plan(self, plan_id: str, changes: PlanChanges, reason: str, actor: str) -> PlanRecord:
        plan_id = validate_id("id", plan_id)
        reason = require_reason(reason, "the plan changes")
        if changes == PlanChanges():
            raise InvalidRequest("nothing to change: give a name, allowance, thresholds, model weights or active flag")
        if changes.active is False and plan_id == self.settings.default_plan:
            raise InvalidRequest(f"plan {plan_id!r} is the default plan of new accounts; it cannot be inactive")
        record = await self.plan_store().update_plan(plan_id, changes, reason, actor)
        await self.refresh_plans()
        return record

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
            batch = await self._knowing_plans(
                queries.list_accounts, cursor, max(size, 100), plan, query, cycle.key, now
            )
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
