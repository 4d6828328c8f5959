"""Requests through Envoy with quotagate (ext_authz) against plain Envoy to the same upstream, in one run.

    scripts/dev python bench/bench_envoy.py [--seconds 5] [--connections 16] [--rounds 1] [--clients N]

Starts, each in its own process: the demo upstream (python -m quotagate.demo_upstream), quotagate
(python -m quotagate.cli serve) and two Envoys to that upstream, built from quotagate.envoyconf: one plain
(the ext_authz filter removed from http_filters) and one with ext_authz -> quotagate. The upstream is also
measured directly, without Envoy, for reference.

For each target: 1 connection with sequential requests (low load), then --connections connections in a closed
loop; POST /v1/chat/completions with a small JSON body and x-demo-completion-tokens: 1 (a one-word reply).
The client speaks HTTP/1.1 keep-alive over asyncio streams with prebuilt requests (far cheaper per request
than an HTTP library, so more of the 2 cores go to what is measured). Targets are measured one after the
other, interleaved per round, so both Envoys see the same machine; the ratios come from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import common
import yaml

from quotagate.envoyconf import EnvoyOptions, build_envoy_config
from quotagate.procs import ManagedProcess, free_port, start_envoy, wait_envoy_ready, wait_for_port

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
CHAT_BODY = json.dumps(
    {
        "model": "demo-small",
        "max_tokens": 50,
        "stream": False,
        "messages": [{"role": "user", "content": "Hello there! Summarise the plot of Hamlet in one line."}],
    },
    separators=(",", ":"),
).encode()
MAX_HEAD = 64 * 1024


# -- the HTTP/1.1 client --------------------------------------------------------------------------------------


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after any failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(common.HOST, self.port, limit=MAX_HEAD)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def request(self, data: bytes) -> int:
        """Sends one prebuilt request, reads the whole response; returns the status."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(data)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.index(b"\r\n", at + 2)
                body = await self.reader.readexactly(int(lower[at + 17 : end]))
            elif b"\r\ntransfer-encoding: chunked" in lower:
                body = await self._read_chunked()
            else:
                raise HttpError("response without content-length or chunked body")
            if b"\r\nconnection: close" in lower:
                await self.close()
        except BaseException:
            await self.close()
            raise
        if status != 200:
            raise HttpError(f"HTTP {status}: {body[:300]!r}")
        return status

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        for _ in range(100_000):
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(chunk[:-2])
        raise HttpError("too many chunks")


def build_requests(port: int, client_key: str, users: int, user_prefix: str = "bench-user") -> tuple[bytes, ...]:
    """One chat completion request per user, the users named `user_prefix`-NNNN."""
    requests = []
    for i in range(users):
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\n"
            f"host: {common.HOST}:{port}\r\n"
            f"authorization: Bearer {client_key}\r\n"
            f"x-user-id: {user_prefix}-{i:04d}\r\n"
            f"x-demo-completion-tokens: 1\r\n"
            f"content-type: application/json\r\n"
            f"content-length: {len(CHAT_BODY)}\r\n\r\n"
        )
        requests.append(head.encode() + CHAT_BODY)
    return tuple(requests)


@dataclass(frozen=True)
class Payload:
    port: int
    requests: tuple[bytes, ...]


async def http_load(
    payload: Payload, concurrency: int, seconds: float, warmup: float, ready: Callable[[], Awaitable[None]]
) -> common.LoadResult:
    """The load entry (common.run_load): `concurrency` connections, one request in flight on each."""
    connections = [Connection(payload.port) for _ in range(concurrency)]
    counter = itertools.count()
    requests, users = payload.requests, len(payload.requests)

    def caller(conn: Connection) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await conn.request(requests[next(counter) % users])

        return call

    try:
        await asyncio.gather(*(c.open() for c in connections))
        calls = [caller(c) for c in connections]
        if warmup > 0:
            warm = await common.closed_loop(calls, warmup, record=False)
            if warm.errors:
                raise RuntimeError(f"warm-up failed: {warm.errors} errors, first: {warm.first_error}")
        await ready()
        return await common.closed_loop(calls, seconds)
    finally:
        await asyncio.gather(*(c.close() for c in connections))


# -- the stack ------------------------------------------------------------------------------------------------


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same bootstrap without the ext_authz filter (its cluster stays, unused)."""
    removed = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typed_config"]
                before = len(hcm["http_filters"])
                hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != EXT_AUTHZ_FILTER]
                removed += before - len(hcm["http_filters"])
    if removed != 1:
        raise RuntimeError(f"expected one {EXT_AUTHZ_FILTER} filter in the Envoy config, found {removed}")
    return config


@dataclass
class Target:
    name: str
    port: int
    proc: ManagedProcess | None = None  # the Envoy under test, if any
    authz: str | None = None  # the Check server it calls: a key of the probed pids
    results: dict[int, common.LoadResult] = field(default_factory=dict)
    marks: dict[int, list[float]] = field(default_factory=dict)  # per level: CPU and Check counts, summed


async def start_envoy_target(
    bench: common.Bench, name: str, config: dict[str, Any], concurrency: int | None
) -> tuple[ManagedProcess, int]:
    listen_port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    path = bench.tmp / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False), encoding="utf-8")
    proc = bench.manage(start_envoy(path, bench.tmp / f"envoy-{name}.log", concurrency=concurrency))
    await wait_envoy_ready(admin_port, timeout=30, process=proc)
    return proc, listen_port


async def start_upstream(bench: common.Bench) -> tuple[ManagedProcess, int]:
    port = free_port()
    argv = [sys.executable, "-m", "quotagate.demo_upstream", "--host", common.HOST, "--port", str(port)]
    proc = bench.manage(ManagedProcess(argv, bench.tmp / "upstream.log", name="demo-upstream").start())
    await wait_for_port(common.HOST, port, timeout=30, process=proc)
    return proc, port


def other_tools() -> str:
    found = [tool for tool in ("wrk", "h2load", "hey", "oha") if shutil.which(tool)]
    return ", ".join(found) if found else "none"


# -- the run --------------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-envoy", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        upstream, upstream_port = await start_upstream(bench)

        def options() -> EnvoyOptions:
            return EnvoyOptions(
                upstream_host=common.HOST,
                upstream_port=upstream_port,
                listen_port=free_port(),
                admin_port=free_port(),
                authz_port=qg.grpc_port,
                decision_port=qg.decision_port,
                envoy_token=common.ENVOY_TOKEN,
            )

        plain_proc, plain_port = await start_envoy_target(
            bench, "plain", plain_config(build_envoy_config(options())), args.envoy_concurrency
        )
        authz_proc, authz_port = await start_envoy_target(
            bench, "quotagate", build_envoy_config(options()), args.envoy_concurrency
        )
        targets = [
            Target("Envoy + quotagate", authz_port, authz_proc, "quotagate"),
            Target("plain Envoy", plain_port, plain_proc),
        ]
        pids = {"quotagate": qg.proc.pid, "upstream": upstream.pid}
        if args.baseline:
            trivial, trivial_port = await common.start_trivial_server(bench)
            config = build_envoy_config(replace(options(), authz_port=trivial_port, decision_port=0))
            trivial_proc, trivial_envoy_port = await start_envoy_target(
                bench, "trivial", config, args.envoy_concurrency
            )
            targets.append(Target("Envoy + trivial authz", trivial_envoy_port, trivial_proc, "trivial"))
            pids["trivial"] = trivial.pid
        if not args.no_direct:
            targets.append(Target("upstream direct", upstream_port))

        # Every account exists and sits in Redis before measuring (the first Check of a user creates it).
        prime = Payload(authz_port, build_requests(authz_port, qg.client_key, args.users))
        conn = Connection(authz_port)
        try:
            for request in prime.requests:
                await conn.request(request)
        finally:
            await conn.close()

        pids |= {"envoy:" + t.name: t.proc.pid for t in targets if t.proc is not None}
        probe = common.Probe(pids, stores.redis_url, qg.http_port)
        levels = [1, args.connections] if args.connections != 1 else [1]

        print(f"bench_envoy: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        workers = args.envoy_concurrency or f"default ({os.cpu_count()})"
        envoys = "three processes (plain, quotagate, trivial authz)" if args.baseline else "two processes"
        print(f"  Envoy: {envoys}, worker threads: {workers}; quotagate: one process; demo upstream: one process")
        load_note = "this process" if args.clients <= 1 else f"up to {args.clients} client processes, summed"
        print(f"  load: HTTP/1.1 keep-alive from {load_note}")
        print(f"        {args.warmup:g} s warm-up + {args.seconds:g} s per phase, {args.rounds} round(s) interleaved")
        print(f"        (other load tools on PATH: {other_tools()}; not used)")
        print(f"  POST /v1/chat/completions, {len(CHAT_BODY)}-byte JSON body, x-demo-completion-tokens: 1\n")

        for round_no in range(args.rounds):
            for level in levels:
                for target in targets:
                    marks: list[common.Snapshot] = []

                    def mark_start(marks: list[common.Snapshot] = marks) -> None:
                        marks.append(probe.snapshot())

                    payload = Payload(target.port, build_requests(target.port, qg.client_key, args.users))
                    result = await asyncio.to_thread(
                        common.run_load, http_load, payload, level, args.clients, args.seconds, args.warmup,
                        mark_start,
                    )  # fmt: skip
                    after = probe.snapshot()
                    before = marks[0]
                    wall = after.wall - before.wall
                    cpu = {name: after.cpu[name] - before.cpu[name] for name in after.cpu}
                    ours = sum(v for k, v in cpu.items() if k != "machine" and not math.isnan(v))
                    other = cpu["machine"] - ours - result.client_cpu
                    checks = common.metric_delta(before.metrics, after.metrics, "quotagate_decisions_total")
                    sample = [wall, cpu.get("envoy:" + target.name, math.nan),
                              cpu[target.authz] if target.authz else math.nan, cpu["upstream"], cpu["redis"],
                              result.client_cpu, other, checks]  # fmt: skip
                    merge_result(target, level, result, sample)
                    p50, p99, _ = result.summary()
                    common.log(
                        f"round {round_no + 1}, {level} conn, {target.name}: {result.rate:,.0f} req/s, "
                        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {result.errors}"
                    )

        return report(targets, levels)


def merge_result(target: Target, level: int, result: common.LoadResult, sample: list[float]) -> None:
    """Pools the rounds: calls, errors and latencies add up; the rate is calls over the summed measured time."""
    if level not in target.results:
        target.results[level] = result
        target.marks[level] = sample
        return
    total = target.results[level]
    seconds = (total.calls / total.rate if total.rate else 0.0) + (result.calls / result.rate if result.rate else 0.0)
    total.calls += result.calls
    total.rate = total.calls / seconds if seconds else 0.0
    total.errors += result.errors
    total.latencies.extend(result.latencies)
    total.first_error = total.first_error or result.first_error
    total.elapsed += result.elapsed
    total.client_cpu += result.client_cpu
    target.marks[level] = [a + b for a, b in zip(target.marks[level], sample, strict=True)]


def report(targets: list[Target], levels: list[int]) -> int:
    headers = ["target", "conns", "clients", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "Checks",
               "envoy CPU%", "authz CPU%", "upstream CPU%", "redis CPU%", "client CPU%", "other CPU%"]  # fmt: skip
    rows: list[list[object]] = []
    problems: list[str] = []
    for level in levels:
        for target in targets:
            result = target.results[level]
            wall, envoy, authz, upstream, redis, client, other, checks = target.marks[level]
            p50, p99, worst = result.summary()

            def pct(seconds: float, wall: float = wall) -> float:
                return 100 * seconds / wall if wall > 0 else math.nan

            rows.append(
                [target.name, level, result.processes, result.calls, result.rate, p50, p99, worst, result.errors,
                 int(checks), pct(envoy), pct(authz), pct(upstream), pct(redis), pct(client), max(0.0, pct(other))]
            )  # fmt: skip
            if result.errors:
                problems.append(f"{target.name}, {level} conns: {result.errors} errors, first: {result.first_error}")
    common.print_table(headers, rows, title="Requests through Envoy (req/s = successful requests / measured seconds)")
    print("Checks: Check calls quotagate answered meanwhile (it must be in the path of exactly one target).")
    print(
        f"CPU%: percent of one core ({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%) over the measured"
        " period; envoy = the Envoy under test; authz = the Check server it calls (quotagate or the trivial one);"
        " other = the rest of the machine (not ours: another workload sharing the cores)."
    )

    plain = next(t for t in targets if t.name == "plain Envoy")
    ratio_rows: list[list[object]] = []
    added_low = math.nan
    for target in targets:
        if target.authz is None:
            continue
        for level in levels:
            a, p = target.results[level], plain.results[level]
            a50, a99, _ = a.summary()
            p50, p99, _ = p.summary()
            ratio_rows.append([target.name, level, a.rate / p.rate if p.rate else math.nan, a50 - p50, a99 - p99])
            if target.authz == "quotagate" and level == 1:
                added_low = a50 - p50
    common.print_table(
        ["with ext_authz", "conns", "throughput ratio to plain", "added p50 ms", "added p99 ms"],
        ratio_rows,
        title="Envoy with ext_authz against plain Envoy (same run)",
    )
    verdict = "met" if added_low <= 1.0 else "NOT met"
    print(f"target <= 1 ms added p50 through Envoy at low load (1 connection): {verdict} ({added_low:.2f} ms)")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--connections", type=int, default=16, help="connections of the loaded phase (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all phases, interleaved; results pooled")
    parser.add_argument("--envoy-concurrency", type=int, help="Envoy worker threads (default: one per core)")
    parser.add_argument("--no-direct", action="store_true", help="do not measure the upstream without Envoy")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure a third Envoy whose ext_authz is bench/trivial_authz.py (always OK, no state)",
    )
    parser.add_argument("--log-level", default="INFO", help="quotagate's log level (default INFO)")
    args = parser.parse_args()
    if (
        args.users < 1
        or not 0 < args.seconds <= 600
        or not 0 <= args.warmup <= 60
        or args.clients < 1
        or not 1 <= args.connections <= 1024
        or not 1 <= args.rounds <= 20
    ):
        parser.error(
            "--users/--clients positive, --seconds 0..600, --warmup 0..60, --connections 1..1024, --rounds 1..20"
        )
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
