"""A lean HTTP/2 client for unary gRPC calls, for load generation (`bench_check.py --client h2`).

grpc.aio's client spends more CPU per call than quotagate's decision port does to answer it: at 2,400 Checks/s
its two processes took 65-72% of this 2-core machine, which then runs quotagate's Check late. This client sends
each call as a fixed header block (no table, so no encoding per call; the channel's metadata, such as the caller
token `authorization: Bearer ...`, is in it) and one DATA frame, and matches the answers by stream id; answers
are decoded with quotagate.unary's remembering HPACK decoder. It honours no flow control of its own sending
(requests are small, far below any server's initial window) and opens windows wide for what it receives. Only
for benchmarks: one connection, no TLS, no retries.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from quotagate.unary.frames import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    PREFACE,
    Flag,
    FrameType,
    Setting,
    complete_frames,
    frame,
    literal,
    settings_frame,
    window_update,
)
from quotagate.unary.headers import BlockDecoder, Headers

Call = Callable[[], Awaitable[None]]
MAX_FRAME = (1 << 24) - 1  # what a server may send once told (SETTINGS_MAX_FRAME_SIZE); this client accepts any


class CallFailed(Exception):
    pass


def _status(headers: Headers) -> tuple[int, str]:
    status, message = -1, ""
    for name, value in headers:
        if name == b"grpc-status":
            status = int(value)
        elif name == b"grpc-message":
            message = value.decode("utf-8", "replace")
    return status, message


class _Client(asyncio.Protocol):
    def __init__(self, authority: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1, 2)
        self._calls: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}
        self._decoder: BlockDecoder[tuple[int, str]] = BlockDecoder(_status)
        self._authority = authority.encode()
        # gRPC metadata (lower-case keys) rides in every call's header block, literal and never indexed.
        self._metadata = b"".join(literal(key.encode(), value.encode()) for key, value in metadata)
        self._blocks: dict[str, bytes] = {}
        self._received = 0
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(
            PREFACE
            + settings_frame({Setting.INITIAL_WINDOW_SIZE: MAX_WINDOW, Setting.ENABLE_PUSH: 0})
            + window_update(0, MAX_WINDOW - DEFAULT_WINDOW)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed")
        for future, _ in self._calls.values():
            if not future.done():
                future.set_exception(CallFailed(str(self._lost)))
        self._calls.clear()

    def _block(self, path: str) -> bytes:
        block = self._blocks.get(path)
        if block is None:
            # :method POST and :scheme http from the static table; the rest literal and never indexed.
            # Then the channel's metadata, encoded once in __init__.
            fields = ((b":path", path.encode()), (b":authority", self._authority),
                      (b"content-type", b"application/grpc"), (b"te", b"trailers"))  # fmt: skip
            block = b"\x83\x86" + b"".join(literal(name, value) for name, value in fields) + self._metadata
            self._blocks[path] = block
        return block

    def call(self, path: str, message: bytes) -> asyncio.Future[bytes]:
        if self._lost is not None or self._transport is None:
            raise CallFailed(f"connection lost: {self._lost}")
        stream = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._calls[stream] = (future, bytearray())
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self._transport.write(
            frame(FrameType.HEADERS, Flag.END_HEADERS, stream, self._block(path))
            + frame(FrameType.DATA, Flag.END_STREAM, stream, body)
        )
        return future

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for kind, flags, stream, payload in complete_frames(self._buffer, MAX_FRAME):
            if kind == FrameType.DATA:
                self._on_data(flags, stream, payload)
            elif kind == FrameType.HEADERS:
                self._on_headers(flags, stream, payload)
            elif kind == FrameType.SETTINGS and not flags & 1:
                self._write(frame(FrameType.SETTINGS, 1, 0))
            elif kind == FrameType.PING and not flags & 1:
                self._write(frame(FrameType.PING, 1, 0, payload))
            elif kind == FrameType.RST_STREAM:
                self._fail(stream, f"stream reset (code {int.from_bytes(payload, 'big')})")
            elif kind == FrameType.GOAWAY and self._transport is not None:
                self._transport.close()

    def _on_data(self, flags: int, stream: int, payload: bytes) -> None:
        self._received += len(payload)
        if self._received > 1 << 30:
            self._write(window_update(0, self._received))
            self._received = 0
        entry = self._calls.get(stream)
        if entry is not None:
            entry[1].extend(payload)

    def _on_headers(self, flags: int, stream: int, payload: bytes) -> None:
        if not flags & Flag.END_HEADERS:
            raise CallFailed("CONTINUATION is not supported by this client")
        status, message = self._decoder.decode(payload)
        if not flags & Flag.END_STREAM:
            return  # the answer's headers; its status comes with the trailers
        entry = self._calls.pop(stream, None)
        if entry is None or entry[0].done():
            return
        future, body = entry
        if status != 0:
            future.set_exception(CallFailed(f"grpc-status {status}: {message}"))
        elif len(body) < 5:
            future.set_exception(CallFailed("an OK answer without a message"))
        else:
            future.set_result(bytes(body[5:]))

    def _fail(self, stream: int, reason: str) -> None:
        entry = self._calls.pop(stream, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(CallFailed(reason))

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class H2Channel:
    """One HTTP/2 connection to a gRPC server; `unary(path)` gives a bytes-in, bytes-out caller. `metadata` goes
    with every call (e.g. common.ENVOY_METADATA), encoded once into the header block."""

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._host, _, port = target.rpartition(":")
        self._port = int(port)
        self._metadata = tuple(metadata)
        self._client: _Client | None = None

    async def connect(self) -> H2Channel:
        loop = asyncio.get_running_loop()
        _, self._client = await loop.create_connection(
            lambda: _Client(self._host, self._metadata), self._host, self._port
        )
        return self

    def unary(self, path: str) -> Callable[[bytes], Awaitable[bytes]]:
        client = self._client
        assert client is not None, "connect() first"

        def call(message: bytes) -> Awaitable[bytes]:
            return client.call(path, message)

        return call

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()


async def open_channels(target: str, count: int, metadata: Sequence[tuple[str, str]] = ()) -> list[Any]:
    return [await H2Channel(target, metadata).connect() for _ in range(count)]
