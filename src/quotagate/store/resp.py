"""A minimal pipelining Redis connection for the Check hot path.

redis-py spends more CPU per command than the whole rest of a Check (pool checkout, retry wrapper, one
write and one read per command). Check only ever runs one Lua script, so this client keeps one connection,
queues every command written in the same event-loop turn into a single write, and matches replies to callers
in order (Redis answers each connection in order). Parsing is hiredis's, in C.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from quotagate.core.errors import StoreUnavailable

COMMAND_TIMEOUT_SECONDS = 2.0


class _RespProtocol(asyncio.Protocol):
    def __init__(self, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader(encoding="utf-8")
        self._waiters: deque[tuple[float, asyncio.Future[Any]]] = deque()  # (deadline, waiter), in send order
        self._pending: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._close_reason = "closed by the server"
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        error = StoreUnavailable(f"redis: connection lost: {exc or self._close_reason}")
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise StoreUnavailable("redis: connection closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append((loop.time() + self._timeout, waiter))
        self._pending.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_deadlines)
        return waiter

    def _check_deadlines(self) -> None:
        # One timer per connection instead of one per command: replies come in order, so only the oldest
        # waiter can be the first to run out of time. A missing reply makes the connection useless.
        self._watchdog = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        deadline = self._waiters[0][0]
        if deadline <= loop.time():
            self._close_reason = f"no reply within {self._timeout}s"
            self.close()
        else:
            self._watchdog = loop.call_at(deadline, self._check_deadlines)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self.closed and self._pending:
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class PipelinedRedis:
    """One lazily (re)connected connection; `evalsha` falls back to loading the script once."""

    def __init__(self, url: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self._timeout = timeout
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://)")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        self._db = int(parts.path.strip("/") or 0)
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout):
                    _, protocol = await loop.create_connection(
                        lambda: _RespProtocol(self._timeout), self._host, self._port
                    )
                    if self._password is not None:
                        auth = (self._username, self._password) if self._username else (self._password,)
                        await self._checked(protocol, ("AUTH", *auth))
                    if self._db:
                        await self._checked(protocol, ("SELECT", self._db))
            except (OSError, TimeoutError) as exc:
                raise StoreUnavailable(f"redis: cannot connect to {self._host}:{self._port}: {exc}") from exc
            self._protocol = protocol
            return protocol

    @staticmethod
    async def _checked(protocol: _RespProtocol, args: tuple[Any, ...]) -> Any:
        reply = await protocol.send(hiredis.pack_command(args))
        if isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailable(f"redis: {args[0]} failed: {reply}")
        return reply

    async def execute(self, *args: Any) -> Any:
        protocol = await self._connection()
        return await protocol.send(hiredis.pack_command(args))

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        reply = await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            await self.execute("SCRIPT", "LOAD", script.source)
            reply = await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        if isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailable(f"redis: script failed: {reply}")
        return reply

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
