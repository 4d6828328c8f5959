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
    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8")
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._pending: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = StoreUnavailable(f"redis: connection lost: {exc or 'closed by the server'}")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise StoreUnavailable("redis: connection closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._pending.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return waiter

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

    def __init__(self, url: str) -> None:
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
                async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                    _, protocol = await loop.create_connection(_RespProtocol, self._host, self._port)
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
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                return await protocol.send(hiredis.pack_command(args))
        except TimeoutError as exc:
            # Replies arrive in order, so a connection with a lost reply is useless from here on.
            protocol.close()
            raise StoreUnavailable(f"redis: no reply within {COMMAND_TIMEOUT_SECONDS}s") from exc

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
