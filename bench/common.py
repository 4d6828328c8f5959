"""Bring-up and measuring helpers shared by the benchmarks in bench/.

- `Bench`: a temp dir plus a LIFO list of cleanups, run on exit (also on Ctrl-C / SIGTERM).
- `start_stores`: PostgreSQL and Redis from --database-url/--redis-url (or QUOTAGATE_BENCH_DATABASE_URL /
  QUOTAGATE_BENCH_REDIS_URL), else embedded ones in the temp dir; a fresh database per run, dropped at the end,
  and a Redis key prefix of the run's own, deleted at the end.
- `start_quotagate`: `python -m quotagate.cli serve` as a separate process, so the load generator never shares
  quotagate's event loop, with a generated config: one trusted client key and a plan with a huge allowance, and
  the caller tokens ENVOY_TOKEN / USAGE_TOKEN (`caller_token_env`), which the benches' gRPC clients and Envoys send.
- `run_load`: a closed-loop load (N workers, each waits for its answer before sending again) for a fixed time,
  in this process or spread over several client processes (multiprocessing, spawn) whose results are summed.
- `open_loop`: calls started on a fixed schedule (so many per second) whatever the answers, for the latency at
  a given rate rather than at a given number of calls in flight; `grpc_load(rate=...)` uses it.
- `percentile`, `print_table`, CPU time of a process, and a Prometheus text scrape.

Everything listens on and talks to 127.0.0.1 only; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import math
import multiprocessing
import os
import platform
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import redis as redis_sync
import redis.asyncio as aioredis
import yaml

from quotagate.adapters.credentials import bearer_metadata
from quotagate.procs import ManagedProcess, free_port, start_embedded_postgres, start_redis, wait_for_port

HOST = "127.0.0.1"
# The caller tokens of every quotagate a benchmark starts (QUOTAGATE_ENVOY_TOKEN / QUOTAGATE_USAGE_TOKEN, set
# explicitly, see caller_token_env): Envoy's goes with Check, ShouldRateLimit and ext_proc (the benches' own calls
# and EnvoyOptions.envoy_token), the usage reporter's with ReportUsage. Fixed, not random: spawned client processes
# import this module again. Not quotagate's defaults, so a client that forgot its token fails at once.
ENVOY_TOKEN = "quotagate-bench-envoy-token"
USAGE_TOKEN = "quotagate-bench-usage-token"
ENVOY_METADATA = bearer_metadata(ENVOY_TOKEN)
USAGE_METADATA = bearer_metadata(USAGE_TOKEN)
BENCH_PLAN = "bench"
# Far beyond anything a benchmark can reserve: nothing is ever denied for quota.
HUGE_ALLOWANCE = 10**15
# Per-call timeout of the load generators; a call slower than this counts as an error.
CALL_TIMEOUT = 10.0
# Hard cap on the calls of one worker in one phase, on top of the time limit.
MAX_CALLS_PER_WORKER = 5_000_000
# Open loop: a call that starts more than this after its slot in the schedule counts as a late start. asyncio's
# timers wake on whole milliseconds (epoll), so a start up to ~1 ms behind is the timer's grain, not a client
# falling behind.
LATE_START = 0.002
# Open loop: at most this many calls in flight per process; past it a start waits (and is late).
MAX_IN_FLIGHT = 20_000

Cleanup = Callable[[], Any]

# Set when the run is being torn down (Ctrl-C, SIGTERM, an error): loads in progress stop at once.
_ABORT = threading.Event()
# Barriers and client processes of the load in progress, so abort_load() can break and stop them.
_LIVE: list[Any] = []


def abort_load() -> None:
    """Stops a load running in another thread of this process (and its client processes) right away."""
    _ABORT.set()
    for item in list(_LIVE):
        if hasattr(item, "abort"):
            with contextlib.suppress(Exception):
                item.abort()
    for item in list(_LIVE):
        if hasattr(item, "terminate"):
            with contextlib.suppress(Exception):
                item.terminate()


# -- process-wide signal handling ----------------------------------------------------------------------------


def _sigterm_to_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM behaves like Ctrl-C, so the same finally blocks stop every child process."""
    signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)


# -- the run: temp dir and cleanups ---------------------------------------------------------------------------


class Bench:
    """A temp dir and the cleanups of everything started in it, run in reverse order on exit."""

    def __init__(self, name: str, keep_tmp: bool = False) -> None:
        self.name = name
        self.keep_tmp = keep_tmp
        self.tmp = Path(tempfile.mkdtemp(prefix=f"quotagate-{name}-"))
        self.processes: list[ManagedProcess] = []
        self._cleanups: list[tuple[str, Cleanup]] = []

    def defer(self, what: str, cleanup: Cleanup) -> None:
        self._cleanups.append((what, cleanup))

    def manage(self, proc: ManagedProcess) -> ManagedProcess:
        """Stop `proc` (its whole process group) at the end."""
        self.processes.append(proc)
        self.defer(proc.name, proc.stop)
        return proc

    async def __aenter__(self) -> Bench:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt | asyncio.CancelledError):
            for proc in self.processes:
                log(f"--- last lines of {proc.name} ({proc.log_path}) ---\n{proc.log_tail(30)}")
        await self.close()

    async def close(self) -> None:
        abort_load()
        while self._cleanups:
            what, cleanup = self._cleanups.pop()
            try:
                result = cleanup()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout=30)
            except BaseException as exc:  # a cleanup must never keep the others from running
                log(f"cleanup of {what} failed: {type(exc).__name__}: {exc}")
        if self.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_main(work: Coroutine[Any, Any, int]) -> int:
    """Runs a benchmark's main coroutine with SIGTERM turned into Ctrl-C, so everything it started is stopped."""
    install_signal_handlers()
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- PostgreSQL and Redis -------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, seconds: float = 5.0) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("QUOTAGATE_BENCH_DATABASE_URL"),
        help="a PostgreSQL server to create the run's database on (default: $QUOTAGATE_BENCH_DATABASE_URL, "
        "else an embedded server in a temp dir)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("QUOTAGATE_BENCH_REDIS_URL"),
        help="a Redis server (default: $QUOTAGATE_BENCH_REDIS_URL, else an embedded redis-server)",
    )
    parser.add_argument("--seconds", type=float, default=seconds, help=f"measured time per phase (default {seconds})")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up time before each phase (default 1)")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes that generate the load (default 1: the load runs in this process)",
    )
    parser.add_argument("--users", type=int, default=100, help="distinct x-user-id values (default 100)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs) at the end")


@dataclass
class Stores:
    database_url: str
    redis_url: str
    redis_prefix: str
    database_note: str
    redis_note: str
    redis_proc: ManagedProcess | None = None


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


async def start_stores(bench: Bench, database_url: str | None, redis_url: str | None) -> Stores:
    if database_url:
        server_url, db_note = database_url, f"PostgreSQL {_redact(database_url)}"
    else:
        log("starting an embedded PostgreSQL ...")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            server_url, stop_pg = start_embedded_postgres(bench.tmp / "postgres")
        bench.defer("embedded postgres", stop_pg)
        db_note = "PostgreSQL embedded (unix socket)"
    name = f"quotagate_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_url, timeout=20)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    async def drop_database() -> None:
        conn = await asyncpg.connect(server_url, timeout=20)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    bench.defer(f"database {name}", drop_database)
    db_note += f", fresh database {name}"

    redis_proc = None
    if redis_url:
        redis_note = f"Redis {_redact(redis_url)}"
    else:
        port = free_port()
        redis_proc = bench.manage(start_redis(bench.tmp / "redis", port))
        await wait_for_port(HOST, port, process=redis_proc)
        redis_url = f"redis://{HOST}:{port}/0"
        redis_note = f"Redis embedded on port {port}"
    prefix = f"qgbench:{secrets.token_hex(5)}:"
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("server")
        redis_note += f" (redis {info.get('redis_version', '?')}), key prefix {prefix}"
    finally:
        await client.aclose()
    if redis_proc is None:
        bench.defer(f"redis keys {prefix}*", lambda: delete_redis_keys(redis_url, prefix))
    return Stores(with_database(server_url, name), redis_url, prefix, db_note, redis_note, redis_proc)


async def delete_redis_keys(redis_url: str, prefix: str, max_keys: int = 20_000_000) -> int:
    """Deletes the run's keys from a Redis that outlives the run (bounded by `max_keys`)."""
    client = aioredis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=prefix + "*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += await client.unlink(*batch)
                batch.clear()
            if deleted + len(batch) >= max_keys:
                break
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


# -- quotagate as a separate process --------------------------------------------------------------------------


@dataclass
class Quotagate:
    proc: ManagedProcess
    grpc_port: int
    http_port: int
    client_key: str
    config_path: Path
    decision_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def decision_target(self) -> str:
        """Check and ShouldRateLimit on the unary server (decision_listen), as the shipped Envoy config asks."""
        return f"{HOST}:{self.decision_port}"


def quotagate_config(stores: Stores, client_key: str) -> dict[str, Any]:
    return {
        "timezone": "UTC",
        "language": "en",
        "default_plan": BENCH_PLAN,
        "estimate": {"minimum": 10, "default_completion_tokens": 50},
        "plans": [{"id": BENCH_PLAN, "monthly_allowance": HUGE_ALLOWANCE}],
        "clients": [{"name": "bench", "key": client_key, "trusted": True}],
        "redis_prefix": stores.redis_prefix,
        # Longer than any run: the sweeper never has a due reservation to charge while we measure.
        "reservation_ttl_seconds": 3600,
    }


def caller_token_env() -> dict[str, str]:
    """The environment that gives a quotagate process the benches' caller tokens."""
    return {"QUOTAGATE_ENVOY_TOKEN": ENVOY_TOKEN, "QUOTAGATE_USAGE_TOKEN": USAGE_TOKEN}


async def start_trivial_server(bench: Bench, unary: bool = False) -> tuple[ManagedProcess, int]:
    """bench/trivial_authz.py (always-OK Check and ext_proc, no state) in its own process: the gRPC floor; with
    `unary`, its Check on quotagate's unary server (the floor of the decision port)."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("trivial_authz.py")), "--port", str(port)]
    argv += ["--unary"] if unary else []
    name = "trivial-unary" if unary else "trivial-authz"
    trivial = bench.manage(ManagedProcess(argv, bench.tmp / f"{name}.log", name=name).start())
    await wait_for_port(HOST, port, timeout=30, process=trivial)
    return trivial, port


async def start_quotagate(
    bench: Bench,
    stores: Stores,
    log_level: str = "INFO",
    profile_path: Path | None = None,
    rate_limits: Path | None = None,
    workers: int = 1,
    extra_config: dict[str, Any] | None = None,
) -> Quotagate:
    """quotagate in its own process; with `profile_path` under cProfile (written when it stops on SIGTERM), with
    `rate_limits` reading that envoyproxy/ratelimit-format file (config key `rate_limits`) instead of its default,
    with `workers` > 1 as `serve --workers N` (a supervisor and N serving processes on the same ports)."""
    client_key = "bench-" + secrets.token_hex(16)
    config_path = bench.tmp / "quotagate.yaml"
    config = quotagate_config(stores, client_key) | (extra_config or {})
    if rate_limits is not None:
        config["rate_limits"] = str(rate_limits)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    grpc_port, http_port, decision_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "QUOTAGATE_DATABASE_URL": stores.database_url,
        "QUOTAGATE_REDIS_URL": stores.redis_url,
        "QUOTAGATE_GRPC_LISTEN": f"{HOST}:{grpc_port}",
        "QUOTAGATE_DECISION_LISTEN": f"{HOST}:{decision_port}",
        "QUOTAGATE_HTTP_LISTEN": f"{HOST}:{http_port}",
        "QUOTAGATE_ADMIN_TOKEN": secrets.token_hex(16),
        **caller_token_env(),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("QUOTAGATE_CONFIG", None)
    env.pop("QUOTAGATE_ENV", None)
    argv = [sys.executable, "-m", "quotagate.cli", "serve", "--config", str(config_path), "--log-level", log_level]
    if profile_path is not None:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile_path)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = bench.manage(ManagedProcess(argv, bench.tmp / "quotagate.log", env=env, name="quotagate").start())
    await wait_for_port(HOST, grpc_port, timeout=60, process=proc)
    await wait_ready(http_port, proc)
    if workers > 1:
        await wait_workers(http_port, workers, proc)
    return Quotagate(proc, grpc_port, http_port, client_key, config_path, decision_port)


async def wait_workers(http_port: int, count: int, proc: ManagedProcess, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Until `count` distinct worker pids answered /metrics (each scrape is a new connection, so any worker)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {count} quotagate workers answered")
        if not proc.alive():
            raise RuntimeError(proc.describe_exit())
        with contextlib.suppress(OSError):
            metrics = await asyncio.to_thread(scrape_metrics, http_port)
            seen |= {k for k in metrics if k.startswith("quotagate_worker_info{")}
        await asyncio.sleep(0.05)


async def wait_ready(http_port: int, proc: ManagedProcess, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    url = f"http://{HOST}:{http_port}/readyz"
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(proc.describe_exit())
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}: {await response.text()}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
    raise TimeoutError(f"quotagate not ready after {timeout}s ({last})")


def scrape_metrics(http_port: int) -> dict[str, float]:
    """quotagate's /metrics as {"name{labels}": value} (blocking)."""
    with urllib.request.urlopen(f"http://{HOST}:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def metric_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    """The change of every series whose name starts with `prefix`, summed."""
    keys = {k for k in after if k.startswith(prefix)}
    return sum(after[k] - before.get(k, 0.0) for k in keys)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process (all its threads) from /proc; NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return math.nan
    # Counted after the command name: utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its living descendants (a `serve --workers N` supervisor and its workers)."""
    total = process_cpu_seconds(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children:
                kids = [int(k) for k in children.read().split()]
        except OSError:
            continue
        total += sum(tree_cpu_seconds(kid) for kid in kids)
    return total


def redis_cpu_seconds(redis_url: str) -> float:
    """CPU time the Redis server used so far, from its own INFO (so it works for a server we did not start)."""
    client = redis_sync.Redis.from_url(redis_url, socket_timeout=5)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info.get("used_cpu_sys", 0.0)) + float(info.get("used_cpu_user", 0.0))


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Snapshot:
    wall: float
    cpu: dict[str, float]
    metrics: dict[str, float]


class Probe:
    """CPU time of the processes under test (and Redis), plus quotagate's metrics, at one moment."""

    def __init__(self, pids: dict[str, int], redis_url: str | None = None, metrics_port: int | None = None) -> None:
        self.pids, self.redis_url, self.metrics_port = pids, redis_url, metrics_port

    def snapshot(self) -> Snapshot:
        cpu = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        cpu["machine"] = machine_busy_seconds()
        if self.redis_url:
            cpu["redis"] = redis_cpu_seconds(self.redis_url)
        metrics = scrape_metrics(self.metrics_port) if self.metrics_port else {}
        return Snapshot(time.perf_counter(), cpu, metrics)


def cpu_percent(before: Snapshot, after: Snapshot, name: str) -> float:
    """Percent of one core `name` used between the snapshots."""
    wall = after.wall - before.wall
    if wall <= 0 or name not in after.cpu:
        return math.nan
    return 100 * (after.cpu[name] - before.cpu[name]) / wall


def print_profile(path: Path, limit: int = 25) -> None:
    """The top of a cProfile file, by own time and by cumulative time."""
    import pstats

    if not path.exists():
        print(f"no profile at {path} (did quotagate stop cleanly?)")
        return
    for order in ("tottime", "cumulative"):
        print(f"--- quotagate profile, top {limit} by {order} ---", flush=True)
        pstats.Stats(str(path), stream=sys.stdout).strip_dirs().sort_stats(order).print_stats(limit)
    sys.stdout.flush()


def machine_note() -> str:
    import grpc

    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


# -- statistics and output ------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of already sorted values; NaN for none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A small aligned table: text left-aligned, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    if title:
        print(title)
    print(line(list(headers)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row).rstrip())
    print(flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# -- load generation ------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    calls: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls only
    first_error: str = ""
    client_cpu: float = 0.0  # CPU seconds the load generator itself used
    processes: int = 1
    rate: float = 0.0  # successful calls per second (summed over client processes)
    late: int = 0  # open loop: calls started more than LATE_START after their slot
    max_lag: float = 0.0  # open loop: the longest delay of a start behind its slot, seconds

    def failed(self, exc: Exception) -> None:
        """Counts a failed call, keeping the first error to report."""
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:500]

    def summary(self) -> tuple[float, float, float]:
        """p50, p99 and max latency in milliseconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan, math.nan, math.nan
        return percentile(ordered, 50) * 1000, percentile(ordered, 99) * 1000, ordered[-1] * 1000


Call = Callable[[], Awaitable[None]]


async def _timed_call(call: Call, t0: float, result: LoadResult, record: bool) -> None:
    """One call of a load, counted in `result`, its latency from `t0` kept when `record`; an error is counted
    and the load goes on."""
    try:
        async with asyncio.timeout(CALL_TIMEOUT):  # not wait_for: that costs one more task per call
            await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        result.failed(exc)
        return
    result.calls += 1
    if record:
        result.latencies.append(time.perf_counter() - t0)


async def closed_loop(calls: Sequence[Call], seconds: float, record: bool = True) -> LoadResult:
    """Runs one worker per entry of `calls`; each calls in a loop until `seconds` passed (or its cap)."""
    result = LoadResult()
    started = time.perf_counter()
    cpu_started = time.process_time()
    end = started + seconds

    async def worker(call: Call) -> None:
        for _ in range(MAX_CALLS_PER_WORKER):
            t0 = time.perf_counter()
            if t0 >= end or _ABORT.is_set():
                return
            await _timed_call(call, t0, result, record)

    await asyncio.gather(*(worker(c) for c in calls))
    result.elapsed = time.perf_counter() - started
    result.client_cpu = time.process_time() - cpu_started
    result.rate = result.calls / result.elapsed if result.elapsed > 0 else 0.0
    if not record:
        result.latencies = []
    return result


async def open_loop(calls: Sequence[Call], rate: float, seconds: float, record: bool = True) -> LoadResult:
    """Starts `rate` calls per second for `seconds`, on a fixed schedule whatever the answers (open loop), using
    the entries of `calls` in turn (e.g. one per channel). A start behind its slot is counted (late, max_lag),
    never skipped: the calls after it go at once until the schedule is caught up. Latency is from the start."""
    result = LoadResult()
    total = min(int(rate * seconds), MAX_CALLS_PER_WORKER)
    in_flight: set[asyncio.Task[None]] = set()

    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        for n in range(total):
            slot = started + n / rate
            now = time.perf_counter()
            if now < slot:
                await asyncio.sleep(slot - now)
                now = time.perf_counter()
            if len(in_flight) >= MAX_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                now = time.perf_counter()
            if _ABORT.is_set():
                break
            lag = now - slot
            if lag > LATE_START:
                result.late += 1
                result.max_lag = max(result.max_lag, lag)
            task = asyncio.create_task(_timed_call(calls[n % len(calls)], now, result, record))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:  # each call ends within CALL_TIMEOUT
            await asyncio.wait(in_flight)
    finally:
        for task in list(in_flight):  # only left when the load is cancelled
            task.cancel()
    result.elapsed = time.perf_counter() - started
    result.client_cpu = time.process_time() - cpu_started
    result.rate = result.calls / result.elapsed if result.elapsed > 0 else 0.0
    return result


# A load entry: `async def load(payload, concurrency, seconds, warmup, ready) -> LoadResult` at module level of
# the benchmark script; it builds its clients, warms up, awaits `ready()` (all client processes are warm), then
# measures with `closed_loop` (or `open_loop`) and closes its clients.
LoadEntry = Callable[[Any, int, float, float, Callable[[], Awaitable[None]]], Coroutine[Any, Any, LoadResult]]


async def grpc_load(
    target: str,
    make_call: Callable[[Any], Call],
    concurrency: int,
    seconds: float,
    warmup: float,
    ready: Callable[[], Awaitable[None]],
    channels: int = 1,
    rate: float = 0.0,
    lean: bool = False,
    metadata: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """The body of a gRPC load entry: `channels` channels (each its own connection, so with `serve --workers`
    the kernel spreads them over the workers), `concurrency` calls in flight over them in turn, warm-up, then the
    measure. With `rate` > 0 the load is open loop instead: `rate` calls/s started over the channels in turn
    (`concurrency` is then not used). `lean`: h2client.H2Channel instead of grpc.aio channels, which send
    `metadata` (e.g. ENVOY_METADATA) with every call, in their fixed header block; grpc.aio callers made by
    `make_call` pass it per call themselves."""
    import grpc
    import h2client

    count = max(1, channels if rate > 0 else min(channels, concurrency))
    opened: list[Any]
    if lean:
        opened = await asyncio.wait_for(h2client.open_channels(target, count, metadata), 30)
    else:
        opened = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)
        ]
    try:
        if not lean:
            await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in opened))
        callers = [make_call(c) for c in opened]
        calls = [callers[i % count] for i in range(concurrency)]

        async def load(period: float, record: bool = True) -> LoadResult:
            if rate > 0:
                return await open_loop(callers, rate, period, record)
            return await closed_loop(calls, period, record)

        if warmup > 0:
            warm = await load(warmup, record=False)
            if warm.errors:
                raise RuntimeError(f"warm-up failed: {warm.errors} errors, first: {warm.first_error}")
        await ready()
        return await load(seconds)
    finally:
        await asyncio.gather(*(c.close() for c in opened))


def split_concurrency(concurrency: int, clients: int) -> list[int]:
    clients = max(1, min(clients, concurrency))
    base, extra = divmod(concurrency, clients)
    return [base + (1 if i < extra else 0) for i in range(clients)]


def _child(entry: LoadEntry, payload: Any, concurrency: int, seconds: float, warmup: float,
           barriers: tuple[Any, Any], results: Any, index: int) -> None:  # fmt: skip
    # The parent stops us; a terminal's Ctrl-C reaches the whole foreground group, so ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def ready() -> None:
        # All warm -> the parent takes its start snapshot -> all go.
        for barrier in barriers:
            await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT)

    try:
        result = asyncio.run(entry(payload, concurrency, seconds, warmup, ready))
        results.put((index, result, ""))
    except BaseException:
        for barrier in barriers:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put((index, None, traceback.format_exc()))


BARRIER_TIMEOUT = 120.0


def run_load(entry: LoadEntry, payload: Any, concurrency: int, clients: int, seconds: float, warmup: float,
             on_start: Callable[[], None] | None = None) -> LoadResult:  # fmt: skip
    """Runs `entry` in this process (clients <= 1) or in up to `clients` spawned processes and sums them.

    `on_start` runs once every client is warmed up, right before the measured period (e.g. to snapshot the
    server's CPU time). Blocking: call it from a thread (asyncio.to_thread) when an event loop runs here.
    """
    if clients <= 1:

        async def ready() -> None:
            if on_start is not None:
                on_start()

        return asyncio.run(entry(payload, concurrency, seconds, warmup, ready))
    shares = split_concurrency(concurrency, clients)
    ctx = multiprocessing.get_context("spawn")
    barriers = (ctx.Barrier(len(shares) + 1), ctx.Barrier(len(shares) + 1))  # the clients and this thread
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(entry, payload, share, seconds, warmup, barriers, results, i), daemon=True)
        for i, share in enumerate(shares)
    ]
    collected: list[LoadResult] = []
    failure = ""
    _LIVE.extend([*barriers, *procs])
    try:
        if _ABORT.is_set():
            raise RuntimeError("the run is being stopped")
        for proc in procs:
            proc.start()
        try:
            barriers[0].wait(BARRIER_TIMEOUT)
            try:
                if on_start is not None:
                    on_start()
            except BaseException:
                barriers[1].abort()
                raise
            barriers[1].wait(BARRIER_TIMEOUT)
        except threading.BrokenBarrierError:
            failure = "the client processes did not all get ready"
        deadline = time.monotonic() + BARRIER_TIMEOUT + seconds + CALL_TIMEOUT
        while len(collected) < len(procs) and not failure:
            if _ABORT.is_set():
                raise RuntimeError("the run is being stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("client processes did not report in time")
            try:
                _, result, error = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    failure = "client processes exited without a result"
                continue
            if result is None:
                failure = f"a client process failed:\n{error}"
            else:
                collected.append(result)
        if failure:
            # The failing child put its traceback on the queue; show it if it is there.
            with contextlib.suppress(queue.Empty):
                for _ in range(len(procs)):
                    _, result, error = results.get(timeout=1.0)
                    if result is None and error:
                        failure += f"\n{error}"
                        break
            raise RuntimeError(failure)
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for item in [*barriers, *procs]:
            _LIVE.remove(item)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    total = LoadResult(processes=len(collected))
    for r in collected:
        total.calls += r.calls
        total.errors += r.errors
        total.elapsed = max(total.elapsed, r.elapsed)
        total.latencies.extend(r.latencies)
        total.first_error = total.first_error or r.first_error
        total.client_cpu += r.client_cpu
        total.rate += r.rate
        total.late += r.late
        total.max_lag = max(total.max_lag, r.max_lag)
    return total
