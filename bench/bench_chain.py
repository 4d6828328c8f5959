"""The whole chain against one LiteLLM proxy process: is quotagate ever the bottleneck in front of LiteLLM?

    scripts/dev python bench/bench_chain.py [--seconds 5] [--connections 32] [--rounds 1] [--workers N]
        [--breakdown] [--paced RATE]

Starts, each in its own process: PostgreSQL and Redis (or uses the given ones), quotagate (`serve`, or
`serve --workers N`), the demo upstream, a real LiteLLM proxy with a mock model (no provider is called; its own
usage figures), and three Envoys built from quotagate.envoyconf:

- plain: ext_authz, ext_proc and the rate-limit filter removed, to the demo upstream;
- chain: the shipped filters (ext_authz Check, rate limit, ext_proc usage capture and settlement), to the demo
  upstream, which answers in well under a millisecond, so the chain itself is what is measured;
- chain + LiteLLM: the same filters, to LiteLLM (quotagate swaps the client's key for LiteLLM's master key).

Phases: 1 connection with sequential requests (plain, chain: the latency quotagate adds at low load), then
--connections connections in a closed loop (chain, LiteLLM direct, chain + LiteLLM: saturation throughput).
It prints the added p50 at low load (target <= 1 ms) and the chain's saturation throughput over LiteLLM's
(target >= 3x), both from the same run on the same machine. --breakdown adds Envoys with Check only and with
Check + ext_proc, the same Envoy with every answer held (its users are on a plan whose thresholds every
request crosses, so Check routes each to the ext_proc whose answers Envoy waits for, as near a threshold; the
run checks Envoy's ext_proc stream counters to be sure), and Check + ext_proc in front of
bench/trivial_authz.py, a server that answers at once: the latency those two filters add whatever the service
does. --paced RATE measures the same low-load targets again at RATE requests a second on a fixed schedule, so
that the services are idle between requests (one connection in a closed loop keeps them busy).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import secrets
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import bench_envoy
import bench_ratelimit
import common
import grpc
import yaml

from quotagate.config import sha256_hex
from quotagate.envoyconf import EXT_PROC_FILTER, WATCH_FILTER, EnvoyOptions, build_envoy_config
from quotagate.procs import free_port, start_litellm, wait_litellm_ready
from quotagate.v1 import admin_pb2, admin_pb2_grpc

TRIVIAL = "do-nothing Check + ext_proc (trivial_authz.py)"
HELD = "Check + ext_proc, every answer held"
# The HELD target's users are on this plan (Admin.UpsertAccount): the first reservation already takes them past
# both thresholds, so no decision settles unseen (core.decide.Decision.settles_unseen) and Check routes every
# answer to the held ext_proc (the behaviour before answers were only watched), for a comparison in the same
# run. The allowance is never used up. A client can no longer choose that route itself: Check removes the
# x-quota-* headers it sends.
NEAR_PLAN = {"id": "bench-near", "monthly_allowance": 10**9, "warn_threshold": 1e-9, "critical_threshold": 2e-9}
HELD_USERS = "bench-near-user"
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(16)
# Envoy's counters of the streams each ext_proc filter opened (stat prefixes "ingress" and "watch").
HELD_STREAMS = "http.ingress.ext_proc.streams_started"
WATCHED_STREAMS = "http.ingress.ext_proc.watch.streams_started"
FILTERS_OFF = ("envoy.filters.http.ext_authz", EXT_PROC_FILTER, WATCH_FILTER, "envoy.filters.http.ratelimit")
LITELLM_CONFIG = {
    "model_list": [
        {
            "model_name": "demo-small",
            "litellm_params": {
                "model": "openai/demo-small",
                "api_key": "mock-provider-key",
                "mock_response": "Hello from LiteLLM's mock model.",
            },
        }
    ],
    "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
}


def without_filters(config: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    removed = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typed_config"]
                before = len(hcm["http_filters"])
                hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in names]
                removed += before - len(hcm["http_filters"])
    if removed != len(names):
        raise RuntimeError(f"expected the filters {names} in the Envoy config, removed {removed}")
    return config


@dataclass(frozen=True)
class PacedPayload(bench_envoy.Payload):
    rate: float = 50.0


PACED_CONNECTIONS = 4  # enough that a slow answer never holds the next start back at a low rate
PACED = 0  # the results' key for the paced phase (the others are keyed by their connection count)


async def paced_load(
    payload: PacedPayload, concurrency: int, seconds: float, warmup: float, ready: Any
) -> common.LoadResult:
    """The load entry for low load: `payload.rate` requests a second on a fixed schedule (open loop), over a few
    connections. Unlike one connection in a closed loop, the services are idle between requests, so what is
    measured is the latency a request meets when nothing else is going on."""
    connections = [bench_envoy.Connection(payload.port) for _ in range(concurrency)]
    requests = payload.requests

    def caller(n: int) -> Any:
        async def call() -> None:
            await connections[n % len(connections)].request(requests[n % len(requests)])

        return call

    try:
        await asyncio.gather(*(c.open() for c in connections))
        calls = [caller(n) for n in range(len(connections) * len(requests))]
        if warmup > 0:
            warm = await common.open_loop(calls, payload.rate, warmup, record=False)
            if warm.errors:
                raise RuntimeError(f"warm-up failed: {warm.errors} errors, first: {warm.first_error}")
        await ready()
        return await common.open_loop(calls, payload.rate, seconds)
    finally:
        await asyncio.gather(*(c.close() for c in connections))


def envoy_admin_port(config: dict[str, Any]) -> int:
    return int(config["admin"]["address"]["socket_address"]["port_value"])


def ext_proc_streams(admin_port: int) -> tuple[int, int]:
    """The streams Envoy opened so far on its held and on its watching ext_proc filter (blocking)."""
    url = f"http://{common.HOST}:{admin_port}/stats?filter=streams_started"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    stats = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(stats.get(HELD_STREAMS, 0)), int(stats.get(WATCHED_STREAMS, 0))


async def put_on_plan(grpc_target: str, users: int, plan_id: str) -> None:
    """The HELD target's accounts, on `plan_id`, before they are first used."""
    metadata = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for i in range(users):
            await admin.UpsertAccount(
                admin_pb2.UpsertAccountRequest(
                    user_id=f"{HELD_USERS}-{i:04d}", plan=plan_id, reason="Benchmark of held answers."
                ),
                metadata=metadata,
                timeout=30,
            )


@dataclass
class Target:
    name: str
    port: int
    key: str
    pids: dict[str, int]
    user_prefix: str = "bench-user"
    admin_port: int | None = None  # Envoy's, for its ext_proc stream counters
    results: dict[int, common.LoadResult] = field(default_factory=dict)
    streams: dict[int, tuple[int, int]] = field(default_factory=dict)  # per load: (held, watched), warm-up included
    cpu: dict[int, dict[str, float]] = field(default_factory=dict)
    checks: dict[int, float] = field(default_factory=dict)


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-chain", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        master_key = "sk-bench-" + secrets.token_hex(16)
        # The shipped descriptors with limits never reached (the shipped 60 a minute would deny the load).
        rate_limits = bench.tmp / "ratelimit.yaml"
        rate_limits.write_text(bench_ratelimit.RATE_LIMITS_YAML, encoding="utf-8")
        qg = await common.start_quotagate(
            bench,
            stores,
            log_level=args.log_level,
            rate_limits=rate_limits,
            workers=args.workers,
            extra_config={
                "upstream": {"api_key": master_key},
                "plans": [*common.quotagate_config(stores, "")["plans"], NEAR_PLAN],
                "admin_tokens": [{"name": "bench-admin", "token_sha256": sha256_hex(ADMIN_TOKEN), "role": "admin"}],
            },
        )
        upstream, upstream_port = await bench_envoy.start_upstream(bench)

        litellm_port = free_port()
        litellm_config = bench.tmp / "litellm.yaml"
        litellm_config.write_text(yaml.safe_dump(LITELLM_CONFIG, sort_keys=False), encoding="utf-8")
        env = {**os.environ, "LITELLM_MASTER_KEY": master_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        litellm = bench.manage(start_litellm(litellm_config, litellm_port, bench.tmp / "litellm.log", env=env))
        await wait_litellm_ready(litellm_port, timeout=120, process=litellm)

        def options(port: int) -> EnvoyOptions:
            return EnvoyOptions(
                upstream_host=common.HOST,
                upstream_port=port,
                listen_port=free_port(),
                admin_port=free_port(),
                authz_port=qg.grpc_port,
                decision_port=qg.decision_port,
                envoy_token=common.ENVOY_TOKEN,
            )

        plain_cfg = without_filters(build_envoy_config(options(upstream_port)), FILTERS_OFF)
        plain, plain_port = await bench_envoy.start_envoy_target(bench, "plain", plain_cfg, args.envoy_concurrency)
        chain_cfg = build_envoy_config(options(upstream_port))
        chain, chain_port = await bench_envoy.start_envoy_target(bench, "chain", chain_cfg, args.envoy_concurrency)
        chain_ll_cfg = build_envoy_config(options(litellm_port))
        chain_ll, chain_ll_port = await bench_envoy.start_envoy_target(
            bench, "chain-litellm", chain_ll_cfg, args.envoy_concurrency
        )
        base = {"quotagate": qg.proc.pid}
        breakdown: list[str] = []
        started: dict[str, tuple[int, int, int]] = {}
        if args.breakdown:
            # The chain's filters one step at a time, to see what each adds at low load; and the same two
            # filters in front of a server that does nothing (bench/trivial_authz.py --unary: Check and ext_proc on
            # the unary server, as quotagate serves them): the floor.
            _, trivial_port = await common.start_trivial_server(bench)
            _, trivial_unary_port = await common.start_trivial_server(bench, unary=True)
            for name, removed, authz_port, decision_port in (
                ("Check only", FILTERS_OFF[1:], qg.grpc_port, qg.decision_port),
                ("Check + ext_proc", FILTERS_OFF[3:], qg.grpc_port, qg.decision_port),
                (TRIVIAL, FILTERS_OFF[3:], trivial_port, trivial_unary_port),
            ):
                opts = dataclasses.replace(options(upstream_port), authz_port=authz_port, decision_port=decision_port)
                cfg = without_filters(build_envoy_config(opts), removed)
                proc, port = await bench_envoy.start_envoy_target(
                    bench, name.split(" (")[0].replace(" ", "").replace("+", "-"), cfg, args.envoy_concurrency
                )
                breakdown.append(name)
                started[name] = (proc.pid, port, envoy_admin_port(cfg))
        targets = {
            "plain": Target("plain Envoy -> demo", plain_port, qg.client_key, {"envoy": plain.pid, "up": upstream.pid}),
            "chain": Target(
                "chain -> demo",
                chain_port,
                qg.client_key,
                {"envoy": chain.pid, "up": upstream.pid} | base,
                admin_port=envoy_admin_port(chain_cfg),
            ),
            "litellm": Target("LiteLLM direct", litellm_port, master_key, {"up": litellm.pid}),
            "chain_ll": Target(
                "chain -> LiteLLM",
                chain_ll_port,
                qg.client_key,
                {"envoy": chain_ll.pid, "up": litellm.pid} | base,
                admin_port=envoy_admin_port(chain_ll_cfg),
            ),
        }
        for name in breakdown:
            envoy_pid, envoy_port, admin_port = started[name]
            pids = {"envoy": envoy_pid, "up": upstream.pid} | (base if name != TRIVIAL else {})
            targets[name] = Target(f"{name} -> demo", envoy_port, qg.client_key, pids, admin_port=admin_port)
        if args.breakdown:
            envoy_pid, envoy_port, admin_port = started["Check + ext_proc"]
            pids = {"envoy": envoy_pid, "up": upstream.pid} | base
            targets[HELD] = Target(
                f"{HELD} -> demo", envoy_port, qg.client_key, pids, user_prefix=HELD_USERS, admin_port=admin_port
            )
            breakdown.insert(breakdown.index("Check + ext_proc") + 1, HELD)
            await put_on_plan(qg.grpc_target, args.users, NEAR_PLAN["id"])

        # Every account exists and sits in Redis before measuring; LiteLLM answers once before it is timed. The
        # HELD users' first answers also carry the in-conversation notices of the thresholds they cross (settings
        # notices.in_conversation), here rather than in the measured phase; a notice adds one text chunk to the
        # answer and would be harmless there anyway.
        priming = [targets["chain"], targets["litellm"]] + ([targets[HELD]] if args.breakdown else [])
        for target in priming:
            conn = bench_envoy.Connection(target.port)
            try:
                for request in bench_envoy.build_requests(target.port, target.key, args.users, target.user_prefix):
                    await conn.request(request)
            finally:
                await conn.close()

        print(f"bench_chain: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        workers = "one process" if args.workers == 1 else f"serve --workers {args.workers}"
        print(f"  quotagate: {workers}; Envoy worker threads: {args.envoy_concurrency or 'default'}")
        print("  chain = Envoy with the shipped filters: ext_authz Check, rate limit, ext_proc usage capture")
        print(f"  load: HTTP/1.1 keep-alive; {args.warmup:g} s warm-up + {args.seconds:g} s per phase, "
              f"{args.rounds} round(s)\n", flush=True)  # fmt: skip

        phases = [(1, ["plain", *breakdown, "chain"]), (args.connections, ["chain", "litellm", "chain_ll"])]
        if args.paced:
            phases.insert(1, (PACED, ["plain", *breakdown, "chain"]))
        for round_no in range(args.rounds):
            for level, names in phases:
                for name in names:
                    await measure(targets[name], level, args, stores.redis_url, qg.http_port, round_no)
        return report(targets, args)


async def measure(
    target: Target, level: int, args: argparse.Namespace, redis_url: str, http_port: int, round_no: int
) -> None:
    probe = common.Probe(target.pids, redis_url, http_port if args.workers == 1 else None)
    marks: list[common.Snapshot] = []

    def mark_start() -> None:
        marks.append(probe.snapshot())

    requests = bench_envoy.build_requests(target.port, target.key, args.users, target.user_prefix)
    streams_before = await asyncio.to_thread(ext_proc_streams, target.admin_port) if target.admin_port else None
    if level == PACED:
        paced = PacedPayload(target.port, requests, rate=args.paced)
        result = await asyncio.to_thread(
            common.run_load, paced_load, paced, PACED_CONNECTIONS, 1, args.seconds, args.warmup, mark_start
        )
    else:
        payload = bench_envoy.Payload(target.port, requests)
        result = await asyncio.to_thread(
            common.run_load, bench_envoy.http_load, payload, level, args.clients, args.seconds, args.warmup, mark_start
        )
    after = probe.snapshot()
    streams = ""
    if target.admin_port and streams_before is not None:
        held, watched = await asyncio.to_thread(ext_proc_streams, target.admin_port)
        held_sum, watched_sum = target.streams.get(level, (0, 0))
        target.streams[level] = (held_sum + held - streams_before[0], watched_sum + watched - streams_before[1])
        streams = f", ext_proc streams held {held - streams_before[0]}, watched {watched - streams_before[1]}"
    before = marks[0]
    wall = after.wall - before.wall
    cpu = {k: 100 * (after.cpu[k] - before.cpu[k]) / wall for k in after.cpu}
    cpu["client"] = 100 * result.client_cpu / wall
    if level in target.results:  # pool rounds
        total = target.results[level]
        seconds = total.calls / total.rate + result.calls / result.rate if total.rate and result.rate else 0.0
        total.calls += result.calls
        total.errors += result.errors
        total.latencies.extend(result.latencies)
        total.rate = total.calls / seconds if seconds else 0.0
        total.first_error = total.first_error or result.first_error
        target.cpu[level] = {k: (target.cpu[level][k] + v) / 2 for k, v in cpu.items()}
    else:
        target.results[level] = result
        target.cpu[level] = cpu
    p50, p99, _ = result.summary()
    load = f"{args.paced:g} req/s paced" if level == PACED else f"{level} conn"
    common.log(
        f"round {round_no + 1}, {load}, {target.name}: {result.rate:,.0f} req/s, p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms, errors {result.errors}{streams}"
    )


def report(targets: dict[str, Target], args: argparse.Namespace) -> int:
    headers = ["target", "load", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "envoy CPU%",
               "quotagate CPU%", "upstream CPU%", "redis CPU%", "client CPU%", "machine CPU%"]  # fmt: skip
    rows: list[list[object]] = []
    problems: list[str] = []
    for level in (1, PACED, args.connections):
        for target in targets.values():
            if level not in target.results:
                continue
            result, cpu = target.results[level], target.cpu[level]
            p50, p99, worst = result.summary()
            load = f"{args.paced:g}/s" if level == PACED else level
            rows.append([target.name, load, result.calls, result.rate, p50, p99, worst, result.errors,
                         cpu.get("envoy", math.nan), cpu.get("quotagate", math.nan), cpu.get("up", math.nan),
                         cpu.get("redis", math.nan), cpu["client"], cpu["machine"]])  # fmt: skip
            if result.errors:
                problems.append(f"{target.name}, {level} conns: {result.errors} errors, first: {result.first_error}")
    if HELD in targets:  # the phase measures the held path only if Check routed every answer there
        for level, (held, watched) in targets[HELD].streams.items():
            if held == 0 or watched:
                problems.append(
                    f"{HELD}, load {level}: {held} held ext_proc streams, {watched} watched, expected only held"
                )
    common.print_table(headers, rows, title="Through the chain and LiteLLM (req/s = successful requests / seconds)")
    print("machine CPU%: all of the machine's busy time (2 cores = 200%), ours and anything else running.")
    print("ext_proc streams Envoy opened per target and load (held: Envoy waits for the answers; watched: it does")
    print("not), warm-up included:")
    for target in targets.values():
        for level, (held, watched) in target.streams.items():
            if held or watched:
                load = f"{args.paced:g}/s" if level == PACED else f"{level} conn"
                print(f"  {target.name}, {load}: held {held}, watched {watched}")

    plain50 = targets["plain"].results[1].summary()[0]
    chain50 = targets["chain"].results[1].summary()[0]
    added = chain50 - plain50
    for key, target in targets.items():
        if key not in ("plain", "chain", "litellm", "chain_ll"):
            print(f"  added p50 at low load with {target.name}: {target.results[1].summary()[0] - plain50:.2f} ms")
    if args.paced:
        plain_paced = targets["plain"].results[PACED].summary()[0]
        print(f"  at {args.paced:g} req/s (paced, open loop; services idle between requests):")
        for key, target in targets.items():
            if key not in ("plain", "litellm", "chain_ll"):
                added_paced = target.results[PACED].summary()[0] - plain_paced
                print(f"    added p50 with {target.name}: {added_paced:.2f} ms")
    chain_rate = targets["chain"].results[args.connections].rate
    litellm_rate = targets["litellm"].results[args.connections].rate
    chain_ll_rate = targets["chain_ll"].results[args.connections].rate
    ratio = chain_rate / litellm_rate if litellm_rate else math.nan
    print()
    print(f"added p50 at low load (1 connection, chain vs plain Envoy): {added:.2f} ms "
          f"(target <= 1 ms: {'met' if added <= 1.0 else 'NOT met'})")  # fmt: skip
    verdict = "met" if ratio >= 3 else "NOT met"
    print(f"saturation, {args.connections} connections: chain {chain_rate:,.0f} req/s, one LiteLLM process "
          f"{litellm_rate:,.0f} req/s: ratio {ratio:.2f} (target >= 3: {verdict})")  # fmt: skip
    print(f"the chain in front of LiteLLM: {chain_ll_rate:,.0f} req/s = "
          f"{chain_ll_rate / litellm_rate if litellm_rate else math.nan:.2f} of LiteLLM alone")  # fmt: skip
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--connections", type=int, default=32, help="connections of the saturation phase")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all phases; results pooled")
    parser.add_argument("--workers", type=int, default=1, help="quotagate serve --workers N (default 1)")
    parser.add_argument("--envoy-concurrency", type=int, help="Envoy worker threads (default: one per core)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure Envoys with only Check, Check + ext_proc, and Check + ext_proc in front of a "
        "do-nothing server (1 conn)",
    )
    parser.add_argument(
        "--paced",
        type=float,
        default=0.0,
        metavar="RATE",
        help="also measure low load as RATE requests a second on a fixed schedule (e.g. 50), besides one "
        "connection in a closed loop",
    )
    parser.add_argument("--log-level", default="WARNING", help="quotagate's log level (default WARNING)")
    args = parser.parse_args()
    if (
        args.users < 1
        or args.clients < 1
        or args.workers < 1
        or not 0 < args.seconds <= 600
        or not 0 <= args.warmup <= 60
        or not 2 <= args.connections <= 1024
        or not 1 <= args.rounds <= 20
        or not 0 <= args.paced <= 1000
    ):
        parser.error(
            "--users/--clients/--workers positive, --seconds 0..600, --warmup 0..60, --connections 2..1024, "
            "--paced 0..1000"
        )
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
