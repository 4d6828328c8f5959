"""Check calls/s and latency straight over gRPC, against quotagate in its own process and real Redis state.

    scripts/dev python bench/bench_check.py [--seconds 5] [--concurrency 1,16,64] [--clients N] [--workers N]
        [--rate R | --half]

Each call is envoy.service.auth.v3.Authorization/Check with the request Envoy would send for
POST /v1/chat/completions: the trusted client key, an x-user-id spread over --users users, a unique
x-request-id and a small JSON chat body in attributes.request.http.raw_body. Every allowed Check places a
reservation in Redis (one Lua script: balance hash, reservation hash, expiry index), so the load exercises
the real hot state. The plan's allowance is huge, so nothing is ever denied.

"quotagate" is Check on quotagate's decision port (the unary server, where the shipped Envoy config sends
it); "quotagate grpc.aio" is the same process's grpc.aio port, which serves Check too. --baseline adds
bench/trivial_authz.py, a Check that does nothing, on each of the two servers.

The request is serialized once per user; per call only the x-request-id header is appended as serialized
protobuf (a later map entry merges into the message), so the client spends its time on gRPC, not protobuf.
Every call carries Envoy's caller token (`authorization: Bearer <common.ENVOY_TOKEN>`), which quotagate is
started with, as Envoy sends it.

The --concurrency levels are closed loops: N callers, each sends when its previous answer came. --rate R adds
an open loop: R calls/s started on a fixed schedule, whatever the answers, so the latency is the one at that
rate. --half first measures saturation in closed loop (concurrency 16 unless --concurrency says otherwise),
then runs each server's open loop at half of the best calls/s it reached there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import common
import grpc
from envoy.service.auth.v3 import external_auth_pb2

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
CHAT_BODY = (
    b'{"model":"demo-small","max_tokens":50,"stream":false,'
    b'"messages":[{"role":"user","content":"Hello there! Summarise the plot of Hamlet in one line."}]}'
)
# x-request-id = <tag 8>-<phase 2>-<pid 7>-<counter 12>: always the same length, see id_prefix().
_ID_TEMPLATE = "t" * 8 + "-00-0000000-000000000000"


_CALLS = itertools.count()


class Denied(Exception):
    pass


def base_request(client_key: str, user: str) -> bytes:
    """The CheckRequest Envoy sends for a chat completion, without x-request-id, serialized."""
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 40000
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = 10000
    http = attrs.request.http
    http.id = "10000000000000000000"
    http.method = "POST"
    http.path = "/v1/chat/completions"
    http.host = "127.0.0.1:10000"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.size = len(CHAT_BODY)
    http.headers.update(
        {
            ":authority": "127.0.0.1:10000",
            ":method": "POST",
            ":path": "/v1/chat/completions",
            ":scheme": "http",
            "authorization": f"Bearer {client_key}",
            "content-type": "application/json",
            "content-length": str(len(CHAT_BODY)),
            "user-agent": "quotagate-bench",
            "x-forwarded-proto": "http",
            "x-user-id": user,
        }
    )
    http.raw_body = CHAT_BODY
    data: bytes = request.SerializeToString()
    return data


def id_prefix() -> bytes:
    """Serialized CheckRequest bytes that, followed by an id of _ID_TEMPLATE's length, set x-request-id."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers["x-request-id"] = _ID_TEMPLATE
    data: bytes = request.SerializeToString()
    assert data.endswith(_ID_TEMPLATE.encode())
    return data[: -len(_ID_TEMPLATE)]


@dataclass(frozen=True)
class Payload:
    target: str
    bases: tuple[bytes, ...]
    prefix: bytes
    tag: str
    phase: int = 0
    channels: int = 1
    rate: float = 0.0  # open loop: calls/s of each client process; 0: closed loop
    lean: bool = False  # h2client instead of grpc.aio


def make_caller(channel: Any, payload: Payload) -> Callable[[], Awaitable[None]]:
    # No serializers: bytes in, bytes out (grpc.aio or h2client). The caller token: h2client's channel has it in
    # its header block (common.grpc_load opens it so); grpc.aio sends it with each call.
    check = channel.unary(CHECK_METHOD) if payload.lean else channel.unary_unary(CHECK_METHOD)
    metadata, lean = common.ENVOY_METADATA, payload.lean
    head = f"{payload.tag}-{payload.phase:02d}-{os.getpid() % 10_000_000:07d}-".encode()
    bases, prefix, users = payload.bases, payload.prefix, len(payload.bases)
    counter = _CALLS  # one count for all the channels of this process: every x-request-id stays unique

    async def call() -> None:
        n = next(counter)
        request = bases[n % users] + prefix + head + b"%012d" % n
        raw = await (check(request) if lean else check(request, timeout=common.CALL_TIMEOUT, metadata=metadata))
        response = external_auth_pb2.CheckResponse.FromString(raw)
        if response.status.code != 0:
            raise Denied(f"Check answered code {response.status.code}: {response.denied_response.body[:200]}")

    return call


async def check_load(
    payload: Payload, concurrency: int, seconds: float, warmup: float, ready: Callable[[], Awaitable[None]]
) -> common.LoadResult:
    """The load entry (common.run_load): `payload.channels` channels per client process, `concurrency` calls in
    flight, or with `payload.rate` that many calls/s in open loop."""
    return await common.grpc_load(
        payload.target, lambda channel: make_caller(channel, payload), concurrency, seconds, warmup, ready,
        payload.channels, payload.rate, payload.lean, common.ENVOY_METADATA,
    )  # fmt: skip


async def prime(payload: Payload) -> None:
    """One Check per user, so every account exists (PostgreSQL) and is cached in Redis before measuring."""
    async with grpc.aio.insecure_channel(payload.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = make_caller(channel, replace(payload, lean=False))
        for _ in payload.bases:
            await call()


def verify_request_encoding(payload: Payload) -> None:
    data = payload.bases[0] + payload.prefix + _ID_TEMPLATE.encode()
    headers = external_auth_pb2.CheckRequest.FromString(data).attributes.request.http.headers
    assert headers["x-request-id"] == _ID_TEMPLATE and headers["x-user-id"], "request id merge is broken"


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(level < 1 or level > 4096 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be integers in 1..4096")
    return levels


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-check", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        profile_path = bench.tmp / "quotagate.prof" if args.profile else None
        qg = await common.start_quotagate(
            bench, stores, log_level=args.log_level, profile_path=profile_path, workers=args.workers
        )
        payload = Payload(
            target=qg.grpc_target,
            bases=tuple(base_request(qg.client_key, f"bench-user-{i:04d}") for i in range(args.users)),
            prefix=id_prefix(),
            tag=secrets.token_hex(4),
            channels=args.channels,
            lean=args.client == "h2",
        )
        verify_request_encoding(payload)
        await prime(payload)
        # With workers each /metrics scrape reaches one of them, so the handler column is left out.
        metrics_port = qg.http_port if args.workers == 1 else None
        probe = common.Probe({"server": qg.proc.pid}, stores.redis_url, metrics_port)
        servers = [
            Server("quotagate", replace(payload, target=qg.decision_target), probe),
            Server("quotagate grpc.aio", payload, probe),
        ]
        if args.baseline:
            for unary, name in ((True, "trivial unary"), (False, "trivial grpc.aio")):
                trivial, port = await common.start_trivial_server(bench, unary=unary)
                probe = common.Probe({"server": trivial.pid}, stores.redis_url)
                servers.append(Server(name, replace(payload, target=f"{common.HOST}:{port}"), probe))

        print(f"bench_check: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        ports = f"decision port {qg.decision_target} (quotagate), gRPC {qg.grpc_target} (quotagate grpc.aio)"
        if args.workers == 1:
            print(f"  quotagate: one process (python -m quotagate.cli serve), {ports}")
        else:
            print(f"  quotagate: serve --workers {args.workers} (server CPU% sums the workers), {ports}")
        if args.baseline:
            print("  baseline: bench/trivial_authz.py, an always-OK Check in its own process, on the unary server"
                  " (trivial unary) and on grpc.aio (trivial grpc.aio)")  # fmt: skip
        kind = "bench/h2client.py connection" if args.client == "h2" else "grpc.aio channel"
        load_note = (
            f"this process (one {kind})"
            if args.clients <= 1
            else f"up to {args.clients} client processes (one {kind} each), results summed"
        )
        if args.concurrency:
            print(f"  load: closed loop from {load_note}; {args.warmup:g} s warm-up + {args.seconds:g} s per level")
        if args.rate or args.half:
            at = f"{args.rate:,.0f} calls/s" if args.rate else "half of each server's best closed-loop calls/s above"
            print(
                f"  open loop: {at}, started on a fixed schedule over {max(1, args.clients)} client process(es) and"
                f" their channels; a start more than {common.LATE_START * 1000:g} ms behind its slot counts as late;"
                f" latency from the start; {args.warmup:g} s warm-up + {args.seconds:g} s"
            )
        if args.workers > 1 and args.channels < args.workers:
            print(f"  note: {args.channels} channel(s) per client process: not every worker gets connections")
        print(f"  users: {args.users}; every allowed Check reserves in Redis\n", flush=True)

        headers = ["server", "concurrency", "clients", "calls", "calls/s", "p50 ms", "p99 ms", "max ms", "errors",
                   "handler ms", "server CPU%", "calls/CPU-s", "redis CPU%", "client CPU%", "other CPU%"]  # fmt: skip
        rows: list[list[object]] = []
        problems: list[str] = []
        best = 0.0
        best_per_core = 0.0
        best_of: dict[str, float] = {}
        phases = itertools.count(1)
        for level in args.concurrency:
            for server in servers:
                m = await measure(server, next(phases), level, args)
                rows.append([server.name, level, *m.row])
                best_of[server.name] = max(best_of.get(server.name, 0.0), m.result.rate)
                if server.name == "quotagate":
                    best = max(best, m.result.rate)
                    best_per_core = max(best_per_core, m.per_core)
                if m.result.errors:
                    problems.append(f"{server.name}, concurrency {level}: {m.result.errors} errors, "
                                    f"first: {m.result.first_error}")  # fmt: skip

        open_rows: list[list[object]] = []
        open_p99 = math.nan
        rate = args.rate or best / 2
        if (args.rate or args.half) and rate < 1:
            problems.append(f"no open loop: the closed loop found no saturation ({best:,.0f} calls/s)")
        elif args.rate or args.half:
            for server in servers:
                # --half: each server at half of its own saturation (the grpc.aio port saturates far lower).
                at = args.rate or best_of.get(server.name, best) / 2
                m = await measure(server, next(phases), 0, args, rate=at)
                late_ms = 1000 * m.result.max_lag
                open_rows.append([server.name, at, *m.row[:7], m.result.late, late_ms, *m.row[7:]])
                if server.name == "quotagate":
                    open_p99 = m.p99
                if m.result.errors:
                    problems.append(f"{server.name}, open loop at {at:,.0f} calls/s: {m.result.errors} errors, "
                                    f"first: {m.result.first_error}")  # fmt: skip
                starts = m.result.calls + m.result.errors
                if starts and m.result.late / starts > 0.01:
                    common.log(f"{server.name}, open loop: {m.result.late:,} of {starts:,} starts were late, the client"
                               " fell behind its schedule (see its CPU% and other CPU%; --clients N spreads the"
                               " schedule over N processes)")  # fmt: skip

        if rows:
            common.print_table(headers, rows, title="Check over gRPC (calls/s = successful calls / measured seconds)")
        if open_rows:
            open_headers = [headers[0], "target calls/s", *headers[2:9], "late starts", "max lag ms", *headers[9:]]
            common.print_table(open_headers, open_rows, title="Check over gRPC in open loop (calls on a schedule)")
            print(
                f"late starts: calls started more than {common.LATE_START * 1000:g} ms after their slot in the"
                " schedule (none skipped); max lag ms: the latest of those starts behind its slot."
            )
        print("handler ms: mean time inside quotagate's Check handler (quotagate_check_duration_seconds, sum/count).")
        print(
            f"CPU%: percent of one core ({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%) over the measured"
            " period; server = the Check server process (all its threads); other = the rest of the machine"
            " (nothing else of ours runs here, so that is another workload sharing the cores)."
        )
        print("calls/CPU-s: calls/s over the server's busy cores (server CPU% / 100): Checks per core-second.")
        if rows:
            verdict = "met" if best_per_core >= 5000 else "NOT met"
            print(
                f"target >= 5,000 Check calls/s per core with real Redis state: {verdict} "
                f"(best {best_per_core:,.0f} calls per core-second; best throughput {best:,.0f} calls/s with "
                f"{args.workers} worker(s))"
            )
        if args.half and open_rows:
            verdict = "met" if open_p99 < 5 else "NOT met"
            print(
                f"target p99 < 5 ms at half of saturation: {verdict} (p99 {open_p99:.2f} ms in open loop at "
                f"{rate:,.0f} calls/s, half of the {best:,.0f} calls/s measured in closed loop)"
            )
        elif open_rows:
            print(f"open loop at {rate:,.0f} calls/s: quotagate p99 {open_p99:.2f} ms")
        for problem in problems:
            print(f"problem: {problem}")
        if profile_path is not None:
            print("\n(quotagate ran under cProfile: the figures above are slowed down by the profiler)")
            await asyncio.to_thread(qg.proc.stop)  # SIGTERM: quotagate stops cleanly and cProfile writes its file
            common.print_profile(profile_path)
        return 1 if problems else 0


@dataclass
class Server:
    name: str
    payload: Payload
    probe: common.Probe


@dataclass
class Measured:
    result: common.LoadResult
    row: list[object]  # the table columns from "clients" on
    p99: float
    per_core: float


async def measure(server: Server, phase: int, level: int, args: argparse.Namespace, rate: float = 0.0) -> Measured:
    """One phase: closed loop at `level` calls in flight, or with `rate` open loop at that many calls/s."""
    marks: list[common.Snapshot] = []

    def mark_start() -> None:
        marks.append(server.probe.snapshot())

    payload = replace(server.payload, phase=phase)
    if rate > 0:
        # Open loop: one schedule per client process, each its share of the rate (as `concurrency` for
        # run_load, `clients` shares of one make exactly `clients` processes).
        clients = max(1, args.clients)
        payload = replace(payload, rate=rate / clients)
        level = clients
    result = await asyncio.to_thread(
        common.run_load, check_load, payload, level, args.clients, args.seconds, args.warmup, mark_start
    )
    after = server.probe.snapshot()
    before = marks[0]
    checks = common.metric_delta(before.metrics, after.metrics, "quotagate_check_duration_seconds_count")
    check_sum = common.metric_delta(before.metrics, after.metrics, "quotagate_check_duration_seconds_sum")
    handler_ms = 1000 * check_sum / checks if checks else math.nan
    p50, p99, worst = result.summary()
    wall = after.wall - before.wall
    server_cpu = common.cpu_percent(before, after, "server")
    redis_cpu = common.cpu_percent(before, after, "redis")
    client_cpu = 100 * result.client_cpu / wall if wall > 0 else math.nan
    other_cpu = common.cpu_percent(before, after, "machine") - server_cpu - redis_cpu - client_cpu
    load = f"open loop at {rate:,.0f} calls/s" if rate > 0 else f"concurrency {level}"
    common.log(f"{server.name}, {load}: {result.rate:,.0f} calls/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    per_core = result.rate / (server_cpu / 100) if server_cpu > 0 else math.nan
    row: list[object] = [result.processes, result.calls, result.rate, p50, p99, worst, result.errors, handler_ms,
                         server_cpu, per_core, redis_cpu, client_cpu, max(0.0, other_cpu)]  # fmt: skip
    return Measured(result, row, p99, per_core)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        help="closed-loop levels (default 1,16,64; with --half 16; with --rate none)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="also run an open loop: this many calls/s started on a fixed schedule, spread over the client "
        "processes and their channels, whatever the answers (late starts are counted, none skipped)",
    )
    load.add_argument(
        "--half",
        action="store_true",
        help="measure saturation in closed loop, then run the open loop at half of its calls/s (the p99 < 5 ms target)",
    )
    parser.add_argument("--log-level", default="INFO", help="quotagate's log level (default INFO)")
    parser.add_argument("--workers", type=int, default=1, help="quotagate serve --workers N (default 1)")
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="gRPC channels (connections) per client process, calls spread over them (default 1); with --workers, "
        "use several so that the kernel can spread connections over the workers",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run quotagate under cProfile and print where its time goes"
    )
    parser.add_argument(
        "--client",
        choices=("grpc", "h2"),
        default="grpc",
        help="the load's client: grpc.aio (default) or bench/h2client.py, a lean HTTP/2 client that leaves the "
        "server more of the machine's CPU (common.CALL_TIMEOUT still bounds each call)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure bench/trivial_authz.py (an always-OK grpc.aio Check server) at each level and rate",
    )
    args = parser.parse_args()
    bad_counts = args.workers < 1 or args.users < 1 or args.clients < 1 or args.channels < 1
    if bad_counts or not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--users and --clients must be positive, --seconds in (0, 600], --warmup in [0, 60]")
    if args.rate and not 1 <= args.rate <= 1_000_000:
        parser.error("--rate must be in [1, 1000000] calls/s")
    if args.concurrency is None:
        args.concurrency = [16] if args.half else [] if args.rate else [1, 16, 64]
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
