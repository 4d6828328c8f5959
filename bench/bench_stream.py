"""Streaming pace: how streamed (SSE) chat completions arrive through Envoy with quotagate and without it.

    scripts/dev python bench/bench_stream.py [--requests 30] [--concurrency 16] [--chunks 50] [--delay-ms 20]

Starts, each in its own process: the demo upstream (python -m quotagate.demo_upstream), quotagate
(python -m quotagate.cli serve) and three Envoys to that upstream, built from quotagate.envoyconf:

- plain Envoy: ext_proc off and the ext_authz filter removed (as bench_envoy.py does);
- Envoy + ext_authz: `EnvoyOptions(ext_proc=False)`, Check -> quotagate only;
- Envoy + ext_authz + ext_proc: the shipped config (`ext_proc=True`), quotagate also observes the response.

The upstream is also streamed from directly, without Envoy, for reference (--no-direct skips it).

Every stream is `POST /v1/chat/completions` with `"stream": true` and no `stream_options`, so through the
ext_proc Envoy quotagate asks the upstream for usage on the way in and takes it out of every event on the way
back (the heaviest path). `x-demo-completion-tokens: N` and `x-demo-chunk-delay-ms: D` make the upstream send
N content events D ms apart (then a finish event, [the usage event], and `data: [DONE]`, also D ms apart).

For each target: --requests streams one after the other, then --requests streams with --concurrency in flight
(the first --concurrency start together, so their chunks leave the upstream in step). Each stream uses a
connection of its own (`connection: close`, the connect is not timed). An asyncio Protocol takes the time of
every read as the bytes arrive, and an event counts as arrived with the read that brought its last byte. Per
stream: time to first content chunk (TTFC, from writing the request), each gap between content chunks, and
the lateness of chunk i against the upstream's schedule, arrival_i - (send + TTFC + i*D), i >= 1; a gap below
D/2 is counted as "batched". Every stream must be 200, carry exactly N content chunks and a finish event, show
no `usage` (the client did not ask for it) and end with `data: [DONE]`.

quotagate's /metrics is scraped around each phase: `quotagate_usage_reports_total{outcome="charged"}` must grow
by exactly the streams sent through the ext_proc Envoy and not at all for the other targets.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import common
from bench_envoy import Connection, plain_config, start_envoy_target, start_upstream

from quotagate.envoyconf import EXT_PROC_FILTER, EnvoyOptions, build_envoy_config
from quotagate.procs import ManagedProcess, free_port

CHARGED = 'quotagate_usage_reports_total{outcome="charged"}'
REPORTS = "quotagate_usage_reports_total"
CHECKS = "quotagate_decisions_total"
CONNECT_TIMEOUT = 5.0
SETTLE_TIMEOUT = 15.0  # ext_proc settles in a task of its own right after the body's end
MAX_CHUNKS_IN_BODY = 1_000_000
PROMPT = "Hello there! Tell me the story of Hamlet, one word at a time."


# -- one stream -----------------------------------------------------------------------------------------------


class _Recorder(asyncio.Protocol):
    """Keeps every read with the moment it arrived; the work is done after the stream."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.pieces: list[tuple[float, bytes]] = []

    def data_received(self, data: bytes) -> None:
        self.pieces.append((time.perf_counter(), data))

    def eof_received(self) -> bool:
        return False  # close our side as well

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class Stream:
    head: float = math.nan  # seconds from writing the request to the end of the response head
    ttfc: float = math.nan  # seconds from writing the request to the first content chunk
    total: float = math.nan  # seconds from writing the request to `data: [DONE]`
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    lateness: list[float] = field(default_factory=list)  # seconds, chunk i against send + TTFC + i*D
    arrivals: list[float] = field(default_factory=list)  # seconds from writing the request to each content chunk
    reads: int = 0
    error: str = ""


class StreamError(Exception):
    pass


def _arrivals(pieces: list[tuple[float, bytes]]) -> tuple[bytes, Any]:
    """All bytes received, and a function from an offset into them to the time its read arrived."""
    raw = b"".join(data for _, data in pieces)
    ends = list(itertools.accumulate(len(data) for _, data in pieces))
    times = [t for t, _ in pieces]

    def at(offset: int) -> float:
        return times[bisect.bisect_right(ends, offset)]

    return raw, at


def _body(raw: bytes) -> tuple[int, int, list[tuple[int, int]], bytes]:
    """Status, the head's end, the body's segments as (body offset, raw offset), and the body (chunked or
    close-delimited)."""
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise StreamError(f"no complete response head ({len(raw)} bytes received)")
    head = raw[:head_end].lower()
    status = int(head[9:12])
    pos = pos_head = head_end + 4
    if b"\r\ntransfer-encoding: chunked" not in head:
        return status, pos, [(0, pos)], raw[pos:]
    segments: list[tuple[int, int]] = []
    parts: list[bytes] = []
    body_len = 0
    for _ in range(MAX_CHUNKS_IN_BODY):
        line_end = raw.find(b"\r\n", pos)
        if line_end < 0:
            raise StreamError("chunked body cut short (no last chunk)")
        size = int(raw[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return status, pos_head, segments, b"".join(parts)
        start = line_end + 2
        data = raw[start : start + size]
        if len(data) < size:
            raise StreamError("chunked body cut short (partial chunk)")
        segments.append((body_len, start))
        parts.append(data)
        body_len += size
        pos = start + size + 2
    raise StreamError("too many chunks")


def analyse(t_send: float, pieces: list[tuple[float, bytes]], chunks: int, delay: float) -> Stream:
    """Checks one recorded response and measures its pace (raises StreamError when it is not as expected)."""
    if not pieces:
        raise StreamError("no response")
    raw, arrived = _arrivals(pieces)
    status, head_end, segments, body = _body(raw)
    if status != 200:
        raise StreamError(f"HTTP {status}: {body[:300]!r}")
    seg_body = [b for b, _ in segments]

    def when(body_offset: int) -> float:
        i = bisect.bisect_right(seg_body, body_offset) - 1
        return arrived(segments[i][1] + body_offset - segments[i][0])

    content: list[float] = []
    total = math.nan
    finished = done = False
    pos = 0
    for _ in range(MAX_CHUNKS_IN_BODY):
        cut = body.find(b"\n\n", pos)
        if cut < 0:
            break
        event, t, pos = body[pos:cut], when(cut + 1), cut + 2
        if done:
            raise StreamError(f"an event after data: [DONE]: {event[:200]!r}")
        payload = b"".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")).strip()
        if payload == b"[DONE]":
            done = True
            total = t - t_send
            continue
        data = json.loads(payload)
        if "usage" in data:
            raise StreamError(f"the client sees usage it did not ask for: {payload[:200]!r}")
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                content.append(t)
            if choice.get("finish_reason"):
                finished = True
    if body[pos:].strip():
        raise StreamError(f"unterminated event at the end: {body[pos:][:200]!r}")
    if not done:
        raise StreamError("the stream does not end with data: [DONE]")
    if not finished:
        raise StreamError("no finish_reason event")
    if len(content) != chunks:
        raise StreamError(f"{len(content)} content chunks instead of {chunks}")
    first = content[0]
    return Stream(
        head=arrived(head_end - 1) - t_send,
        ttfc=first - t_send,
        total=total,
        gaps=[b - a for a, b in itertools.pairwise(content)],
        lateness=[t - first - i * delay for i, t in enumerate(content) if i],
        arrivals=[t - t_send for t in content],
        reads=len(pieces),
    )


async def one_stream(port: int, request: bytes, chunks: int, delay: float) -> Stream:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, recorder = await asyncio.wait_for(
        loop.create_connection(lambda: _Recorder(done), common.HOST, port), CONNECT_TIMEOUT
    )
    try:
        t_send = time.perf_counter()
        transport.write(request)
        # Bounded: the whole schedule twice over, plus slack.
        await asyncio.wait_for(asyncio.shield(done), 10 + 2 * (chunks + 3) * delay)
    finally:
        transport.close()
    return analyse(t_send, recorder.pieces, chunks, delay)


def build_request(port: int, client_key: str, user: str, chunks: int, delay_ms: int) -> bytes:
    body = json.dumps(
        {
            "model": "demo-small",
            "max_tokens": chunks,
            "stream": True,
            "messages": [{"role": "user", "content": PROMPT}],
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\n"
        f"host: {common.HOST}:{port}\r\n"
        f"authorization: Bearer {client_key}\r\n"
        f"x-user-id: {user}\r\n"
        f"x-demo-completion-tokens: {chunks}\r\n"
        f"x-demo-chunk-delay-ms: {delay_ms}\r\n"
        f"accept: text/event-stream\r\n"
        f"content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    )
    return head.encode() + body


# -- phases ---------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    streams: list[Stream] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per probed process
    charged: float = 0.0
    other_reports: float = 0.0  # usage reports with another outcome (duplicate, failed, invalid)
    checks: float = 0.0

    def add(self, other: Phase) -> None:
        self.streams += other.streams
        self.errors += other.errors
        self.wall += other.wall
        for name, value in other.cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + value
        self.charged += other.charged
        self.other_reports += other.other_reports
        self.checks += other.checks


@dataclass
class Target:
    name: str
    port: int
    proc: ManagedProcess | None
    ext_proc: bool = False
    phases: dict[str, Phase] = field(default_factory=dict)


async def run_streams(
    port: int, requests: list[bytes], concurrency: int, chunks: int, delay: float, deadline: float
) -> Phase:
    """len(requests) streams, at most `concurrency` at a time (workers take the next one as theirs end)."""
    phase = Phase()
    queue = iter(requests)

    async def worker() -> None:
        for request in queue:
            if time.monotonic() > deadline or common._ABORT.is_set():
                phase.errors.append("phase deadline passed")
                return
            try:
                phase.streams.append(await one_stream(port, request, chunks, delay))
            except (StreamError, OSError, TimeoutError, ValueError, KeyError, AttributeError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}"[:500])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return phase


async def wait_charged(port: int, before: dict[str, float], expected: int) -> dict[str, float]:
    """Scrapes /metrics until the charged count grew by `expected` (settlement is asynchronous), or times out."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        after = await asyncio.to_thread(common.scrape_metrics, port)
        grown = after.get(CHARGED, 0.0) - before.get(CHARGED, 0.0)
        if grown >= expected or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.1)


# -- the run --------------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    delay = args.delay_ms / 1000
    async with common.Bench("bench-stream", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        qg = await common.start_quotagate(bench, stores, log_level=args.log_level)
        upstream, upstream_port = await start_upstream(bench)

        def options(ext_proc: bool) -> EnvoyOptions:
            return EnvoyOptions(
                upstream_host=common.HOST,
                upstream_port=upstream_port,
                listen_port=free_port(),
                admin_port=free_port(),
                authz_port=qg.grpc_port,
                decision_port=qg.decision_port,
                ext_proc=ext_proc,
                envoy_token=common.ENVOY_TOKEN,
            )

        configs = {
            "plain Envoy": plain_config(build_envoy_config(options(ext_proc=False))),
            "Envoy + ext_authz": build_envoy_config(options(ext_proc=False)),
            "Envoy + ext_authz + ext_proc": build_envoy_config(options(ext_proc=True)),
        }
        for name, config in configs.items():
            filters = [f["name"] for f in _http_filters(config)]
            if (EXT_PROC_FILTER in filters) != name.endswith("ext_proc"):
                raise RuntimeError(f"{name}: unexpected http_filters {filters}")
        targets: list[Target] = []
        for (name, config), short in zip(configs.items(), ("plain", "authz", "extproc"), strict=True):
            proc, port = await start_envoy_target(bench, short, config, args.envoy_concurrency)
            targets.append(Target(name, port, proc, ext_proc=name.endswith("ext_proc")))
        if not args.no_direct:
            targets.append(Target("upstream direct", upstream_port, None))
        by_name = {t.name: t for t in targets}
        users = [f"bench-stream-{i:03d}" for i in range(args.users)]

        # Every account exists before measuring (the first Check of a user creates it in PostgreSQL):
        # one JSON request per user through the ext_authz-only Envoy (a reservation, never charged).
        authz_port = by_name["Envoy + ext_authz"].port
        conn = Connection(authz_port)
        try:
            for user in users:
                body = b'{"model":"demo-small","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}'
                await conn.request(
                    (
                        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {common.HOST}:{authz_port}\r\n"
                        f"authorization: Bearer {qg.client_key}\r\nx-user-id: {user}\r\n"
                        f"x-demo-completion-tokens: 1\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(body)}\r\n\r\n"
                    ).encode()
                    + body
                )
        finally:
            await conn.close()
        # Warm-up, not measured: a few short streams per target (gRPC connections to quotagate, upstream pools).
        for target in targets:
            warm = [build_request(target.port, qg.client_key, u, 3, 1) for u in users[:4]]
            phase = await run_streams(target.port, warm, 2, 3, 0.001, time.monotonic() + 60)
            if phase.errors:
                raise RuntimeError(f"warm-up through {target.name} failed: {phase.errors[0]}")
        # Let the warm-up's settlements land before the first snapshot.
        await asyncio.sleep(0.5)

        pids = {"quotagate": qg.proc.pid, "upstream": upstream.pid}
        pids |= {"envoy:" + t.name: t.proc.pid for t in targets if t.proc is not None}
        probe = common.Probe(pids, None, qg.http_port)
        phases = [("sequential", 1), (f"{args.concurrency} concurrent", args.concurrency)]

        print(f"bench_stream: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}")
        print(f"  {stores.redis_note}")
        workers = args.envoy_concurrency or f"default ({os.cpu_count()})"
        print(f"  Envoy: three processes, worker threads: {workers}; quotagate: one process; demo upstream: one")
        print(
            f"  each stream: POST /v1/chat/completions, stream=true, no stream_options; {args.chunks} content chunks"
            f" {args.delay_ms} ms apart; {args.requests} streams per phase and target, {args.rounds} round(s)"
        )
        print("  lateness of chunk i = arrival_i - (send + TTFC + i*D); batched = gaps < D/2\n")

        counter = itertools.count()
        for round_no in range(args.rounds):
            for phase_name, concurrency in phases:
                for target in targets:
                    requests = [
                        build_request(target.port, qg.client_key, users[next(counter) % len(users)], args.chunks,
                                      args.delay_ms)
                        for _ in range(args.requests)
                    ]  # fmt: skip
                    before = probe.snapshot()
                    client_before = time.process_time()
                    limit = time.monotonic() + 60 + 3 * args.requests * (args.chunks + 3) * delay
                    phase = await run_streams(target.port, requests, concurrency, args.chunks, delay, limit)
                    mid = probe.snapshot()
                    client_cpu = time.process_time() - client_before
                    expected = len(phase.streams) if target.ext_proc else 0
                    metrics = await wait_charged(qg.http_port, before.metrics, expected) if expected else mid.metrics
                    phase.wall = mid.wall - before.wall
                    phase.cpu = {k: mid.cpu[k] - before.cpu[k] for k in mid.cpu}
                    ours = sum(v for k, v in phase.cpu.items() if k != "machine" and not math.isnan(v))
                    phase.cpu["client"] = client_cpu
                    phase.cpu["other"] = max(0.0, phase.cpu.pop("machine") - ours - client_cpu)
                    phase.charged = metrics.get(CHARGED, 0.0) - before.metrics.get(CHARGED, 0.0)
                    phase.other_reports = common.metric_delta(before.metrics, metrics, REPORTS) - phase.charged
                    phase.checks = common.metric_delta(before.metrics, metrics, CHECKS)
                    target.phases.setdefault(phase_name, Phase()).add(phase)
                    s = summarise(phase.streams)
                    common.log(
                        f"round {round_no + 1}, {phase_name}, {target.name}: {len(phase.streams)} streams, "
                        f"TTFC p50 {s['ttfc50']:.2f} ms, gap p99 {s['gap99']:.2f} ms, "
                        f"lateness p99 {s['late99']:.2f} ms, errors {len(phase.errors)}, charged {phase.charged:g}"
                    )
        return report(targets, [name for name, _ in phases], args)


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    filters: list[dict[str, Any]] = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    return filters


# -- the report -----------------------------------------------------------------------------------------------


def by_name(targets: list[Target], name: str) -> Target:
    return next(t for t in targets if t.name == name)


def per_index_median(streams: list[Stream]) -> list[float]:
    """For each chunk index, the median over the streams of its arrival after the request (ms)."""
    if not streams:
        return []
    columns = zip(*(s.arrivals for s in streams), strict=True)
    return [common.percentile(sorted(c), 50) * 1000 for c in columns]


def summarise(streams: list[Stream]) -> dict[str, float]:
    """Percentiles in milliseconds over the streams (TTFC, total) and over all their chunks (gaps, lateness)."""
    head = sorted(s.head * 1000 for s in streams)
    ttfc = sorted(s.ttfc * 1000 for s in streams)
    total = sorted(s.total * 1000 for s in streams)
    gaps = sorted(g * 1000 for s in streams for g in s.gaps)
    late = sorted(x * 1000 for s in streams for x in s.lateness)
    p = common.percentile
    return {
        "head50": p(head, 50), "head99": p(head, 99),
        "ttfc50": p(ttfc, 50), "ttfc99": p(ttfc, 99), "ttfcmax": ttfc[-1] if ttfc else math.nan,
        "gap50": p(gaps, 50), "gap99": p(gaps, 99), "gapmax": gaps[-1] if gaps else math.nan,
        "gapmin": gaps[0] if gaps else math.nan,
        "late50": p(late, 50), "late99": p(late, 99), "latemax": late[-1] if late else math.nan,
        "total50": p(total, 50), "total99": p(total, 99),
    }  # fmt: skip


def report(targets: list[Target], phase_names: list[str], args: argparse.Namespace) -> int:
    delay_ms = args.delay_ms
    problems: list[str] = []
    stats: dict[tuple[str, str], dict[str, float]] = {}
    headers = ["target", "streams", "errors", "head p50", "TTFC p50", "TTFC p99", "gap p50", "gap p99", "gap max",
               "gap min", "batched", "late p50", "late p99", "late max", "total p50"]  # fmt: skip
    side: list[list[object]] = []
    for phase_name in phase_names:
        rows: list[list[object]] = []
        for target in targets:
            phase = target.phases[phase_name]
            s = stats[target.name, phase_name] = summarise(phase.streams)
            batched = sum(1 for st in phase.streams for g in st.gaps if g * 1000 < delay_ms / 2)

            def pct(name: str, phase: Phase = phase) -> float:
                value = phase.cpu.get(name, math.nan)
                return 100 * value / phase.wall if phase.wall > 0 else math.nan

            rows.append(
                [target.name, len(phase.streams), len(phase.errors), s["head50"], s["ttfc50"], s["ttfc99"],
                 s["gap50"], s["gap99"], s["gapmax"], s["gapmin"], batched, s["late50"], s["late99"], s["latemax"],
                 s["total50"]]
            )  # fmt: skip
            side.append(
                [target.name, phase_name, int(phase.charged), int(phase.other_reports), int(phase.checks),
                 pct("envoy:" + target.name) if target.proc else math.nan, pct("quotagate"), pct("upstream"),
                 pct("client"), pct("other")]
            )  # fmt: skip
            sent = len(phase.streams) + len(phase.errors)
            if phase.errors:
                problems.append(f"{target.name}, {phase_name}: {len(phase.errors)} failed, first: {phase.errors[0]}")
            want = len(phase.streams) if target.ext_proc else 0
            if phase.charged != want or phase.other_reports:
                problems.append(
                    f"{target.name}, {phase_name}: {sent} streams, quotagate charged {phase.charged:g} "
                    f"(expected {want}), other usage reports {phase.other_reports:g}"
                )
        common.print_table(headers, rows, title=f"Streams, {phase_name} (milliseconds)")
    print(
        "head: request written -> response head. TTFC: request written -> first content chunk. gap: between"
        " consecutive content chunks (all chunks of all streams)."
        f" late: chunk i - (TTFC + i*{delay_ms} ms), i >= 1. batched: gaps < {delay_ms / 2:g} ms."
        " total: request -> data: [DONE] (through ext_proc the hidden usage event adds one more upstream delay).\n"
    )
    common.print_table(
        ["target", "phase", "charged", "other reports", "Checks", "envoy CPU%", "qg CPU%", "upstream CPU%",
         "client CPU%", "other CPU%"],
        side,
        title="quotagate's counters and CPU per phase",
    )  # fmt: skip
    print(
        "charged / other reports: growth of quotagate_usage_reports_total{outcome=charged} / other outcomes;"
        " Checks: growth of quotagate_decisions_total."
        f" CPU%: percent of one core over the phase ({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%);"
        " other = the rest of the machine (not ours).\n"
    )

    diff_rows: list[list[object]] = []
    for phase_name in phase_names:
        plain = stats["plain Envoy", phase_name]
        for target in targets:
            if target.name == "plain Envoy":
                continue
            s = stats[target.name, phase_name]
            diff_rows.append(
                [target.name, phase_name] + [s[k] - plain[k] for k in
                 ("ttfc50", "ttfc99", "gap50", "gap99", "gapmax", "late50", "late99", "latemax")]
            )  # fmt: skip
    common.print_table(
        ["against plain Envoy", "phase", "ΔTTFC p50", "ΔTTFC p99", "Δgap p50", "Δgap p99", "Δgap max", "Δlate p50",
         "Δlate p99", "Δlate max"],
        diff_rows,
        title="Difference to plain Envoy, same run (ms; positive = later / longer than plain)",
    )  # fmt: skip

    # The upstream's own drift (its sleeps overshoot) is in every target's lateness; comparing chunk i with
    # chunk i of plain Envoy, each as the median over the streams, takes it out.
    index_rows: list[list[object]] = []
    for phase_name in phase_names:
        plain_med = per_index_median(by_name(targets, "plain Envoy").phases[phase_name].streams)
        for target in targets:
            if target.name == "plain Envoy":
                continue
            med = per_index_median(target.phases[phase_name].streams)
            delta = [a - b for a, b in zip(med, plain_med, strict=True)] if med and plain_med else []
            after_first = sorted(d - delta[0] for d in delta[1:]) if delta else []
            ordered = sorted(delta)
            index_rows.append(
                [target.name, phase_name, delta[0] if delta else math.nan, common.percentile(ordered, 50),
                 ordered[-1] if ordered else math.nan, delta[-1] if delta else math.nan,
                 common.percentile(after_first, 50), after_first[-1] if after_first else math.nan]
            )  # fmt: skip
    common.print_table(
        ["against plain Envoy", "phase", "chunk 0", "median chunk", "worst chunk", "last chunk",
         "median after 1st", "worst after 1st"],
        index_rows,
        title="Chunk i after the request (median over the streams) minus the same through plain Envoy (ms)",
    )  # fmt: skip
    print(
        "median/worst chunk: over i = 0..N-1; after 1st: chunk i's difference minus chunk 0's (what the stream"
        " adds once it has started).\n"
    )
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print("every stream was complete (N content chunks, finish, no usage shown, data: [DONE]); quotagate charged"
              " every stream through the ext_proc Envoy and none of the others")  # fmt: skip
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"),
        help="PostgreSQL server for the run's fresh database (default: $QUOTAGATE_BENCH_DATABASE_URL, else embedded)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"),
        help="Redis server (default: $QUOTAGATE_BENCH_REDIS_URL, else an embedded redis-server)",
    )
    parser.add_argument("--requests", type=int, default=30, help="streams per phase and target (default 30)")
    parser.add_argument("--concurrency", type=int, default=16, help="streams in flight in the loaded phase (16)")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream (default 50)")
    parser.add_argument("--delay-ms", type=int, default=20, help="ms between the upstream's events (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all phases, interleaved; results pooled")
    parser.add_argument("--users", type=int, default=16, help="distinct x-user-id values (default 16)")
    parser.add_argument("--envoy-concurrency", type=int, help="Envoy worker threads (default: one per core)")
    parser.add_argument("--no-direct", action="store_true", help="do not stream from the upstream without Envoy")
    parser.add_argument("--log-level", default="INFO", help="quotagate's log level (default INFO)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) at the end")
    args = parser.parse_args()
    if (
        not 1 <= args.requests <= 1000
        or not 1 <= args.concurrency <= 256
        or not 1 <= args.chunks <= 2000
        or not 0 <= args.delay_ms <= 1000
        or not 1 <= args.rounds <= 10
        or not 1 <= args.users <= 1000
    ):
        parser.error("--requests 1..1000, --concurrency 1..256, --chunks 1..2000, --delay-ms 0..1000, --rounds 1..10")
    return common.run_main(main_async(args))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
