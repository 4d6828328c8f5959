"""`quotagate admin`: the operators' daily tasks from the shell, over the Admin gRPC API.

Human-readable output by default, `--json` for scripts. Errors are one line on stderr, and the exit code says
what kind of failure it was (see EXIT_CODES), so scripts can branch on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2

EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.UNAUTHENTICATED: 3,
    grpc.StatusCode.PERMISSION_DENIED: 4,
    grpc.StatusCode.NOT_FOUND: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
}
BAR_WIDTH = 24

Call = Callable[[admin_pb2_grpc.AdminStub, list[tuple[str, str]]], Awaitable[Message]]


def add_admin_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="operators' tasks over the Admin API (accounts, credits, ...)")
    admin.add_argument(
        "--server", default=os.environ.get("QUOTAGATE_ADMIN_SERVER", "127.0.0.1:50051"), help="quotagate gRPC address"
    )
    admin.add_argument("--token", help="admin token (default: $QUOTAGATE_ADMIN_TOKEN)")
    # Mutual TLS, for an admin port configured with admin.tls: any of them switches the channel to TLS.
    admin.add_argument(
        "--cacert", default=os.environ.get("QUOTAGATE_ADMIN_CACERT"), help="CA of the server's certificate (PEM)"
    )
    admin.add_argument("--cert", default=os.environ.get("QUOTAGATE_ADMIN_CERT"), help="client certificate (PEM)")
    admin.add_argument("--key", default=os.environ.get("QUOTAGATE_ADMIN_KEY"), help="client private key (PEM)")
    admin.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    tasks = admin.add_subparsers(dest="task", required=True)

    account = tasks.add_parser("account", help="one account").add_subparsers(dest="action", required=True)
    show = account.add_parser("show", help="an account with its live balance")
    show.add_argument("user")
    edit = account.add_parser("set", help="create an account or change its details, plan or allowance (role admin)")
    edit.add_argument("user")
    edit.add_argument("--email")
    edit.add_argument("--name")
    edit.add_argument("--plan")
    allowance = edit.add_mutually_exclusive_group()
    allowance.add_argument("--allowance", type=int, help="the account's own monthly allowance")
    allowance.add_argument("--plan-allowance", action="store_true", help="back to the plan's allowance")
    edit.add_argument("--reason", required=True)

    grant = tasks.add_parser("grant", help="add credit tokens to an account (unblocks it at once)")
    grant.add_argument("user")
    grant.add_argument("amount", type=int)
    grant.add_argument("--reason", required=True, help="why: written to the ledger and the audit log")
    grant.add_argument("--expires", help="when the credits expire (ISO 8601, e.g. 2026-12-31T23:59:59-03:00)")
    grant.add_argument("--source", default="admin")

    for name, text in (
        ("suspend", "refuse the account's requests (403)"),
        ("activate", "serve the account again"),
        ("reset", "zero the allowance used in the current cycle (role admin)"),
    ):
        action = tasks.add_parser(name, help=text)
        action.add_argument("user")
        action.add_argument("--reason", required=True)

    adjust = tasks.add_parser("adjust", help="remove credit tokens (a negative adjustment)")
    adjust.add_argument("user")
    adjust.add_argument("amount", type=int, help="tokens to remove")
    adjust.add_argument("--reason", required=True)

    accounts = tasks.add_parser("accounts", help="many accounts").add_subparsers(dest="action", required=True)
    listing = accounts.add_parser("list", help="accounts with their balances, one line each")
    listing.add_argument("--state", choices=["normal", "warn", "critical", "blocked", "suspended"])
    listing.add_argument("--plan")
    listing.add_argument("--search", help="part of the user id, e-mail or name")
    listing.add_argument("--limit", type=int, default=50, help="accounts per page (at most 500)")
    listing.add_argument("--page", default="", help="the page token printed after the previous page")

    usage = tasks.add_parser("usage", help="an account's usage in a cycle (default: the current one)")
    usage.add_argument("user")
    usage.add_argument("--by", choices=["day", "model", "none"], default="none")
    usage.add_argument("--cycle", default="", help='e.g. "2026-11"')

    keys = tasks.add_parser("keys", help="client keys for Check (role admin)").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="a new client key; its secret is printed once")
    create.add_argument("name")
    acts_as = create.add_mutually_exclusive_group(required=True)
    acts_as.add_argument("--trusted", action="store_true", help="the client may assert users with x-user-id")
    acts_as.add_argument("--user", help="the one user an untrusted key acts for")
    create.add_argument("--reason", default="", help="written to the audit log")
    key_list = keys.add_parser("list", help="the client keys in the database (never their secrets)")
    key_list.add_argument("--active", action="store_true", help="leave out revoked keys")
    revoke = keys.add_parser("revoke", help="refuse a client key (401) from now on")
    revoke.add_argument("name")
    revoke.add_argument("--reason", required=True)

    plans = tasks.add_parser("plans", help="plans (list: role viewer; create, update: role admin)").add_subparsers(
        dest="action", required=True
    )
    plan_list = plans.add_parser("list", help="the plans with their allowances and accounts")
    plan_list.add_argument("--active", action="store_true", help="leave out inactive plans")
    for name, text in (
        ("create", "a new plan"),
        ("update", "change a plan; its accounts' next decision uses the change"),
    ):
        plan = plans.add_parser(name, help=text)
        plan.add_argument("id")
        plan.add_argument("--name")
        plan.add_argument("--allowance", type=int, required=name == "create", help="tokens a month")
        plan.add_argument("--warn", type=float, help="warn threshold, a fraction of the allowance (e.g. 0.8)")
        plan.add_argument("--critical", type=float, help="critical threshold (e.g. 0.95)")
        plan.add_argument(
            "--weight",
            action="append",
            default=[],
            metavar="PATTERN=IN,OUT",
            help="a model weight, e.g. 'gpt-4o*=2.5,10' (repeat it; on update the list replaces the plan's)",
        )
        if name == "update":
            plan.add_argument("--clear-weights", action="store_true", help="remove the plan's model weights")
        state = plan.add_mutually_exclusive_group()
        if name == "update":
            state.add_argument("--active", action="store_true", help="take new accounts again")
        state.add_argument("--inactive", action="store_true", help="keep its accounts but take no new ones")
        plan.add_argument("--reason", required=True)

    export = tasks.add_parser("export", help="usage events as CSV or JSON lines, streamed (role viewer)")
    export.add_argument("--user", default="", help="one account (default: every account)")
    export.add_argument("--cycle", default="", help='e.g. "2026-11" (default: the current cycle)')
    export.add_argument("--format", choices=["csv", "jsonl"], required=True)
    export.add_argument("-o", "--output", help="file to write (default: standard output)")

    payments = tasks.add_parser("payments", help="card payments through Stripe Checkout").add_subparsers(
        dest="action", required=True
    )
    pay_list = payments.add_parser("list", help="payments, newest first (role viewer)")
    pay_list.add_argument("--user", default="")
    pay_list.add_argument(
        "--status", choices=["open", "paid", "unpaid", "failed", "expired", "refunded", "partially_refunded"]
    )
    pay_list.add_argument("--session", default="", help="a Checkout Session id (cs_...)")
    pay_list.add_argument("--since", help="created at or after (ISO 8601 with offset)")
    pay_list.add_argument("--until", help="created before (ISO 8601 with offset)")
    pay_list.add_argument("--limit", type=int, default=50)
    pay_list.add_argument("--page", default="")
    reconcile = payments.add_parser(
        "reconcile", help="read a Checkout Session from Stripe and credit it if paid, once (role operator)"
    )
    reconcile.add_argument("session_id")

    for name, text in (("ledger", "an account's ledger entries"), ("audit", "the audit log (of one account)")):
        log = tasks.add_parser(name, help=text + ", newest first")
        log.add_argument("user", nargs="?" if name == "audit" else None, default="")
        log.add_argument("--limit", type=int, default=50)
        log.add_argument("--page", default="")


def _timestamp(value: str) -> timestamp_pb2.Timestamp:
    at = datetime.fromisoformat(value)
    if at.tzinfo is None:
        raise ValueError(f"{value!r} needs a timezone offset (e.g. -03:00 or Z)")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at.astimezone(UTC))
    return ts


def _call(args: argparse.Namespace) -> Call:
    if args.task == "account" and args.action == "set":
        upsert = admin_pb2.UpsertAccountRequest(
            user_id=args.user, reason=args.reason, clear_allowance_override=args.plan_allowance
        )
        for field in ("email", "name", "plan"):
            if getattr(args, field) is not None:
                setattr(upsert, field, getattr(args, field))
        if args.allowance is not None:
            upsert.allowance_override = args.allowance
        return lambda stub, md: stub.UpsertAccount(upsert, metadata=md, timeout=10)
    if args.task == "account":
        request = admin_pb2.GetAccountRequest(user_id=args.user)
        return lambda stub, md: stub.GetAccount(request, metadata=md, timeout=10)
    if args.task == "grant":
        grant = admin_pb2.GrantCreditsRequest(
            user_id=args.user, amount=args.amount, reason=args.reason, source=args.source
        )
        if args.expires:
            grant.expires_at.CopyFrom(_timestamp(args.expires))
        return lambda stub, md: stub.GrantCredits(grant, metadata=md, timeout=10)
    if args.task == "accounts":
        listing = admin_pb2.ListAccountsRequest(
            state=args.state or "", plan=args.plan or "", query=args.search or "", page_size=args.limit,
            page_token=args.page,
        )  # fmt: skip
        return lambda stub, md: stub.ListAccounts(listing, metadata=md, timeout=30)
    if args.task == "usage":
        usage = admin_pb2.GetUsageRequest(user_id=args.user, cycle=args.cycle, group_by=args.by)
        return lambda stub, md: stub.GetUsage(usage, metadata=md, timeout=30)
    if args.task == "ledger":
        ledger = admin_pb2.ListLedgerRequest(user_id=args.user, page_size=args.limit, page_token=args.page)
        return lambda stub, md: stub.ListLedger(ledger, metadata=md, timeout=30)
    if args.task == "audit":
        audit = admin_pb2.ListAuditLogRequest(target=args.user, page_size=args.limit, page_token=args.page)
        return lambda stub, md: stub.ListAuditLog(audit, metadata=md, timeout=30)
    if args.task == "keys":
        return _key_call(args)
    if args.task == "plans":
        return _plan_call(args)
    if args.task == "payments":
        return _payment_call(args)
    if args.task == "adjust":
        adjust = admin_pb2.AdjustCreditsRequest(user_id=args.user, amount=args.amount, reason=args.reason)
        return lambda stub, md: stub.AdjustCredits(adjust, metadata=md, timeout=10)
    if args.task == "reset":
        reset = admin_pb2.ResetCycleRequest(user_id=args.user, reason=args.reason)
        return lambda stub, md: stub.ResetCycle(reset, metadata=md, timeout=10)
    status = admin_pb2.SetAccountStatusRequest(user_id=args.user, reason=args.reason)
    if args.task == "suspend":
        return lambda stub, md: stub.SuspendAccount(status, metadata=md, timeout=10)
    return lambda stub, md: stub.ActivateAccount(status, metadata=md, timeout=10)


def _key_call(args: argparse.Namespace) -> Call:
    if args.action == "create":
        create = admin_pb2.CreateClientKeyRequest(
            name=args.name, trusted=args.trusted, user_id=args.user or "", reason=args.reason
        )
        return lambda stub, md: stub.CreateClientKey(create, metadata=md, timeout=10)
    if args.action == "list":
        listing = admin_pb2.ListClientKeysRequest(active_only=args.active)
        return lambda stub, md: stub.ListClientKeys(listing, metadata=md, timeout=30)
    revoke = admin_pb2.RevokeClientKeyRequest(name=args.name, reason=args.reason)
    return lambda stub, md: stub.RevokeClientKey(revoke, metadata=md, timeout=10)


def _weight(text: str) -> admin_pb2.ModelWeight:
    pattern, sep, factors = text.rpartition("=")
    parts = factors.split(",")
    try:
        if not sep or not pattern or len(parts) != 2:
            raise ValueError
        return admin_pb2.ModelWeight(pattern=pattern, input=float(parts[0]), output=float(parts[1]))
    except ValueError:
        raise ValueError(f"--weight {text!r}: expected PATTERN=INPUT,OUTPUT, e.g. 'gpt-4o*=2.5,10'") from None


def _plan_call(args: argparse.Namespace) -> Call:
    if args.action == "list":
        listing = admin_pb2.ListPlansRequest(active_only=args.active)
        return lambda stub, md: stub.ListPlans(listing, metadata=md, timeout=30)
    weights = [_weight(w) for w in args.weight]
    if args.action == "create":
        create = admin_pb2.CreatePlanRequest(
            id=args.id, name=args.name or "", monthly_allowance=args.allowance, model_weights=weights,
            reason=args.reason,
        )  # fmt: skip
        if args.warn is not None:
            create.warn_threshold = args.warn
        if args.critical is not None:
            create.critical_threshold = args.critical
        if args.inactive:
            create.active = False
        return lambda stub, md: stub.CreatePlan(create, metadata=md, timeout=10)
    if weights and args.clear_weights:
        raise ValueError("give --weight or --clear-weights, not both")
    update = admin_pb2.UpdatePlanRequest(
        id=args.id, model_weights=weights, replace_model_weights=bool(weights) or args.clear_weights,
        reason=args.reason,
    )  # fmt: skip
    for field, value in (
        ("name", args.name),
        ("monthly_allowance", args.allowance),
        ("warn_threshold", args.warn),
        ("critical_threshold", args.critical),
    ):
        if value is not None:
            setattr(update, field, value)
    if args.active or args.inactive:
        update.active = args.active
    # The call returns once every account on the plan has the change in its hot state: allow for big plans.
    return lambda stub, md: stub.UpdatePlan(update, metadata=md, timeout=300)
def _payment_call(args: argparse.Namespace) -> Call:
    if args.action == "reconcile":
        reconcile = admin_pb2.ReconcilePaymentRequest(session_id=args.session_id)
        return lambda stub, md: stub.ReconcilePayment(reconcile, metadata=md, timeout=30)
    listing = admin_pb2.ListPaymentsRequest(
        user_id=args.user, status=args.status or "", session_id=args.session, page_size=args.limit,
        page_token=args.page,
    )  # fmt: skip
    if args.since:
        listing.start.CopyFrom(_timestamp(args.since))
    if args.until:
        listing.end.CopyFrom(_timestamp(args.until))
    return lambda stub, md: stub.ListPayments(listing, metadata=md, timeout=30)


def run_admin(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("QUOTAGATE_ADMIN_TOKEN", "")
    if not token:
        print("quotagate admin: no admin token: pass --token or set QUOTAGATE_ADMIN_TOKEN", file=sys.stderr)
        return EXIT_CODES[grpc.StatusCode.UNAUTHENTICATED]
    if args.task == "export":
        return _run_export(args, token)
    try:
        call = _call(args)
        credentials = _credentials(args)
    except ValueError as exc:
        print(f"quotagate admin: {exc}", file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(_send(args.server, token, call, credentials))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        print(f"quotagate admin: {code.name.lower()}: {exc.details()}", file=sys.stderr)
        return EXIT_CODES.get(code, 1)
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        print(render(reply))
    return 0


def _run_export(args: argparse.Namespace, token: str) -> int:
    request = admin_pb2.ExportUsageRequest(user_id=args.user, cycle=args.cycle, format=args.format)
    try:
        credentials = _credentials(args)
    except ValueError as exc:
        print(f"quotagate admin: {exc}", file=sys.stderr)
        return 2
    try:
        if args.output:
            with open(args.output, "wb") as out:
                written = asyncio.run(_export(args.server, token, request, out.write, credentials))
            print(f"wrote {written:,} bytes to {args.output}", file=sys.stderr)
        else:
            asyncio.run(_export(args.server, token, request, sys.stdout.buffer.write, credentials))
            sys.stdout.buffer.flush()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        print(f"quotagate admin: {code.name.lower()}: {exc.details()}", file=sys.stderr)
        return EXIT_CODES.get(code, 1)
    except OSError as exc:
        print(f"quotagate admin: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


async def _export(
    server: str,
    token: str,
    request: admin_pb2.ExportUsageRequest,
    write: Callable[[bytes], Any],
    credentials: grpc.ChannelCredentials | None,
) -> int:
    """Writes each chunk as it arrives (nothing is gathered in memory); returns the bytes written."""
    written = 0
    async with _channel(server, credentials) as channel:
        stream = admin_pb2_grpc.AdminStub(channel).ExportUsage(request, metadata=[("authorization", f"Bearer {token}")])
        async for chunk in stream:
            write(chunk.data)
            written += len(chunk.data)
    return written


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials when --cacert, --cert or --key (or their variables) are given; None for plaintext."""
    if not (args.cacert or args.cert or args.key):
        return None
    if bool(args.cert) != bool(args.key):
        raise ValueError("give --cert and --key together (the client certificate and its private key)")
    files: dict[str, bytes | None] = {}
    for option in ("cacert", "cert", "key"):
        path = getattr(args, option)
        try:
            files[option] = Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ValueError(f"--{option} {path}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(
        root_certificates=files["cacert"], private_key=files["key"], certificate_chain=files["cert"]
    )


def _channel(server: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(server)
    return grpc.aio.secure_channel(server, credentials)


async def _send(server: str, token: str, call: Call, credentials: grpc.ChannelCredentials | None = None) -> Message:
    async with _channel(server, credentials) as channel:
        return await call(admin_pb2_grpc.AdminStub(channel), [("authorization", f"Bearer {token}")])


def bar(used: int, allowance: int, width: int = BAR_WIDTH) -> str:
    """A used/allowance bar; an overdraft fills it and is marked with '!'."""
    if allowance <= 0:
        return "[" + "!" * width + "]"
    filled = min(width, round(used / allowance * width))
    return "[" + "#" * filled + "." * (width - filled) + "]" + ("!" if used > allowance else "")


def render_balance(balance: usage_pb2.Balance) -> list[str]:
    reset = balance.reset_at.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"state      {balance.state}",
        f"cycle      {balance.cycle}  (resets {reset})",
        f"allowance  {bar(balance.allowance_used, balance.allowance)} {balance.used_percent:5.1f}%  "
        f"{balance.allowance_used:,} of {balance.allowance:,} used",
        f"credits    {balance.credits:,}",
        f"reserved   {balance.reserved:,}",
        f"remaining  {balance.remaining:,}",
    ]


def render(reply: Message) -> str:
    if isinstance(reply, admin_pb2.Account):
        who = reply.user_id + (f"  <{reply.email}>" if reply.email else "") + (f"  {reply.name}" if reply.name else "")
        lines = [f"account    {who}", f"plan       {reply.plan}", f"status     {reply.status}"]
        return "\n".join(lines + render_balance(reply.balance))
    if isinstance(reply, admin_pb2.GrantCreditsResponse):
        return "\n".join([f"grant      #{reply.grant_id} added", *render_balance(reply.balance)])
    if isinstance(reply, admin_pb2.AdjustCreditsResponse):
        return "\n".join([f"removed    {reply.removed:,} credit tokens", *render_balance(reply.balance)])
    if isinstance(reply, admin_pb2.ListAccountsResponse):
        rows = [
            [a.user_id, a.plan, a.balance.state, bar(a.balance.allowance_used, a.balance.allowance, 12),
             f"{a.balance.allowance_used:,}/{a.balance.allowance:,}", f"{a.balance.credits:,}"]
            for a in reply.accounts
        ]  # fmt: skip
        return table(["user", "plan", "state", "allowance", "used", "credits"], rows, reply.next_page_token)
    if isinstance(reply, admin_pb2.GetUsageResponse):
        rows = [
            [r.period or r.model or "total", f"{r.requests:,}", f"{r.prompt_tokens:,}", f"{r.completion_tokens:,}",
             f"{r.cost:,}"]
            for r in [*reply.rows, reply.total]
        ]  # fmt: skip
        return table(["period/model", "requests", "prompt", "completion", "charged"], rows, "")
    if isinstance(reply, admin_pb2.ListLedgerResponse):
        rows = [
            [_when(e.created_at), e.kind, e.draws_from, f"{e.amount:+,}", e.request_id or "-", e.reason, e.actor or "-"]
            for e in reply.entries
        ]
        return table(["when", "kind", "from", "amount", "request", "reason", "by"], rows, reply.next_page_token)
    if isinstance(reply, admin_pb2.ListAuditLogResponse):
        rows = [[_when(e.created_at), e.actor, e.action, e.target, e.reason] for e in reply.entries]
        return table(["when", "by", "action", "target", "reason"], rows, reply.next_page_token)
    if isinstance(reply, admin_pb2.CreateClientKeyResponse):
        return "\n".join(
            [
                f"key        {reply.key.name} created",
                f"secret     {reply.secret}",
                "           (shown only now: store it where the client reads it)",
                f"acts for   {_acts_for(reply.key)}",
            ]
        )
    if isinstance(reply, admin_pb2.ClientKey):
        revoked = _when(reply.revoked_at) if reply.HasField("revoked_at") else "-"
        return "\n".join([f"key        {reply.name}", f"acts for   {_acts_for(reply)}", f"revoked    {revoked}"])
    if isinstance(reply, admin_pb2.ListClientKeysResponse):
        rows = [
            [k.name, "yes" if k.trusted else "no", k.user_id or "-", _when(k.created_at), k.created_by or "-",
             _when(k.revoked_at) if k.HasField("revoked_at") else "-"]
            for k in reply.keys
        ]  # fmt: skip
        return table(["name", "trusted", "user", "created", "by", "revoked"], rows, "")
    if isinstance(reply, admin_pb2.Plan):
        weights = ", ".join(f"{w.pattern} in {w.input:g} out {w.output:g}" for w in reply.model_weights) or "-"
        return "\n".join(
            [
                f"plan       {reply.id}" + (f"  {reply.name}" if reply.name else ""),
                f"allowance  {reply.monthly_allowance:,} tokens a month",
                f"thresholds warn {_percent(reply.warn_threshold)}, critical {_percent(reply.critical_threshold)}",
                f"weights    {weights}",
                f"status     {'active' if reply.active else 'inactive (takes no new accounts)'}",
                f"accounts   {reply.accounts:,}",
            ]
        )
    if isinstance(reply, admin_pb2.ListPlansResponse):
        rows = [
            [p.id, p.name or "-", f"{p.monthly_allowance:,}", _percent(p.warn_threshold),
             _percent(p.critical_threshold), str(len(p.model_weights)), "yes" if p.active else "no", f"{p.accounts:,}"]
            for p in reply.plans
        ]  # fmt: skip
        return table(["id", "name", "allowance", "warn", "critical", "weights", "active", "accounts"], rows, "")
    if isinstance(reply, admin_pb2.ListPaymentsResponse):
        rows = [
            [_when(p.created_at), p.user_id, p.package_id or "-", f"{p.tokens:,}", _money(p.amount, p.currency),
             p.status, p.session_id or p.payment_intent]
            for p in reply.payments
        ]  # fmt: skip
        return table(["when", "user", "package", "tokens", "amount", "status", "session"], rows, reply.next_page_token)
    if isinstance(reply, admin_pb2.ReconcilePaymentResponse):
        outcome = "credited now" if reply.granted else "nothing granted"
        if not reply.granted and reply.payment.grant_id:
            outcome = f"credited before (grant #{reply.payment.grant_id})"
        return "\n".join(
            [
                f"session    {reply.payment.session_id}",
                f"stripe     {reply.session_status}, payment {reply.payment_status}",
                f"user       {reply.payment.user_id}",
                f"tokens     {reply.payment.tokens:,} ({reply.payment.package_id})",
                f"status     {reply.payment.status}",
                f"outcome    {outcome}",
            ]
        )
    return json_format.MessageToJson(reply)


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100, 1):g}%"


def _money(amount: int, currency: str) -> str:
    return f"{amount / 100:,.2f} {currency.upper()}"


def _acts_for(key: admin_pb2.ClientKey) -> str:
    return "any user (trusted: x-user-id)" if key.trusted else key.user_id


def _when(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: list[list[str]], next_page: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not rows:
        lines.append("(none)")
    if next_page:
        lines.append(f"more: --page {next_page}")
    return "\n".join(lines)
