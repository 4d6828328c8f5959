"""A raw HTTP/2 client for attack tests: frames go out exactly as built (however wrong), and what the server
sends back is parsed into a summary (GOAWAY code, RST_STREAM codes, grpc-status of trailers).

Plain non-blocking sockets on the running loop, no h2 state machine: an attack needs to break the protocol on
purpose, and a client that "never reads" must really leave its socket unread (a small receive buffer, so the
server's unsent bytes pile up on its side, where they are measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import hpack
from harness import ENVOY_TOKEN

from quotagate.unary.frames import PREFACE, ErrorCode, Flag, FrameType, Setting, frame, settings_frame

Header = tuple[str, str]
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


def grpc_headers(path: str, *extra: Header, token: str = ENVOY_TOKEN) -> list[Header]:
    """The header list of a gRPC call as a conforming client sends it."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", f"Bearer {token}"),
        *extra,
    ]


def message(payload: bytes) -> bytes:
    """One gRPC message: uncompressed flag, 4-byte length, payload."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def headers(stream_id: int, block: bytes, *, end_stream: bool = False, end_headers: bool = True) -> bytes:
    flags = (Flag.END_HEADERS if end_headers else 0) | (Flag.END_STREAM if end_stream else 0)
    return frame(FrameType.HEADERS, flags, stream_id, block)


def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return frame(FrameType.DATA, Flag.END_STREAM if end_stream else 0, stream_id, payload)


def split_block(stream_id: int, block: bytes, size: int = 16_384, end_stream: bool = False) -> bytes:
    """A header block as HEADERS and CONTINUATION frames of at most `size` bytes."""
    pieces = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if i == 0:
            out.append(headers(stream_id, piece, end_stream=end_stream, end_headers=last))
        else:
            out.append(frame(FrameType.CONTINUATION, Flag.END_HEADERS if last else 0, stream_id, piece))
    return b"".join(out)


@dataclass
class Seen:
    """What the server sent on one connection."""

    goaway: int | None = None  # error code of the first GOAWAY
    resets: dict[int, int] = field(default_factory=dict)  # stream -> RST_STREAM code
    statuses: dict[int, int] = field(default_factory=dict)  # stream -> grpc-status of its trailers
    messages: dict[int, bytes] = field(default_factory=dict)  # stream -> grpc-message of its trailers
    pings: int = 0
    settings: dict[int, int] = field(default_factory=dict)  # the server's SETTINGS
    closed: bool = False  # EOF or reset from the server
    bytes_read: int = 0

    def goaway_name(self) -> str:
        return "no GOAWAY" if self.goaway is None else ErrorCode(self.goaway).name


class Peer:
    """One raw HTTP/2 connection (client side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.seen = Seen()
        self.encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = 1 << 20
        self._buf = bytearray()
        self._block: bytearray | None = None
        self.send_stalled = False  # a send did not complete in time: the server stopped reading
        self.send_failed = False  # a send found the connection closed (EPIPE, ECONNRESET)

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        settings: dict[Setting, int] | None = None,
        rcvbuf: int | None = None,
        preface: bool = True,
        timeout: float = 2.0,  # noqa: ASYNC109
    ) -> Peer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:  # set before connect, so the window the kernel offers stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        except BaseException:
            sock.close()
            raise
        peer = cls(sock)
        if preface:
            await peer.send(PREFACE + settings_frame(settings or {}))
        return peer

    def block(self, header_list: Sequence[Header | hpack.NeverIndexedHeaderTuple]) -> bytes:
        """A header block from this connection's encoder (whose table follows what has been encoded: blocks go
        out in the order they were built)."""
        return bytes(self.encoder.encode(header_list))

    async def send(self, payload: bytes, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """True once sent; False when the server closed the connection or stopped reading (`send_stalled`)."""
        if self.send_failed or self.send_stalled:
            return False
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, payload), timeout)
        except TimeoutError:
            self.send_stalled = True
            return False
        except OSError:  # EPIPE, ECONNRESET: the server closed it
            self.send_failed = True
            return False
        return True

    async def read(
        self,
        until: Callable[[Seen], bool] = lambda seen: False,
        timeout: float = 2.0,  # noqa: ASYNC109
        max_bytes: int = 64 << 20,
    ) -> Seen:
        """Reads and parses what the server sends until `until(seen)`, its close, `timeout` seconds or
        `max_bytes` bytes (frames are summed up as they come, never kept)."""
        deadline = time.monotonic() + timeout
        start = self.seen.bytes_read
        while not until(self.seen) and not self.seen.closed and self.seen.bytes_read - start < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 18), left)
            except TimeoutError:
                break
            except OSError:
                self.seen.closed = True
                break
            if not chunk:
                self.seen.closed = True
                break
            self.seen.bytes_read += len(chunk)
            self._parse(chunk)
        return self.seen

    def _parse(self, chunk: bytes) -> None:
        buf = self._buf
        buf += chunk
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > len(buf):
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            self._frame(kind, flags, stream_id, bytes(buf[pos + 9 : end]))
            pos = end
        del buf[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        seen = self.seen
        if kind == FrameType.GOAWAY and seen.goaway is None and len(payload) >= 8:
            seen.goaway = int.from_bytes(payload[4:8], "big")
        elif kind == FrameType.RST_STREAM and len(payload) == 4:
            seen.resets[stream_id] = int.from_bytes(payload, "big")
        elif kind == FrameType.PING and not flags & Flag.END_STREAM:  # the ACK bit is END_STREAM's
            seen.pings += 1
        elif kind == FrameType.SETTINGS and not flags & 0x1:
            for i in range(0, len(payload) - 5, 6):
                seen.settings[int.from_bytes(payload[i : i + 2], "big")] = int.from_bytes(payload[i + 2 : i + 6], "big")
        elif kind in (FrameType.HEADERS, FrameType.CONTINUATION):
            self._header_fragment(kind, flags, stream_id, payload)

    def _header_fragment(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == FrameType.HEADERS:
            start, end = 0, len(payload)
            if flags & Flag.PADDED:
                start, end = 1, end - payload[0]
            if flags & Flag.PRIORITY:
                start += 5
            self._block = bytearray(payload[start:end])
        elif self._block is not None:
            self._block += payload
        if self._block is None or not flags & Flag.END_HEADERS:
            return
        block, self._block = bytes(self._block), None
        for name, value in self._decoder.decode(block, raw=True):
            if name == b"grpc-status":
                self.seen.statuses[stream_id] = int(value)
            elif name == b"grpc-message":
                self.seen.messages[stream_id] = value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


async def open_many(port: int, count: int, timeout: float = 0.5) -> list[socket.socket]:  # noqa: ASYNC109
    """Up to `count` TCP connections that never send a byte; those the kernel does not complete within
    `timeout` seconds (a full accept queue) are given up."""
    loop = asyncio.get_running_loop()

    async def one() -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        except (TimeoutError, OSError):
            sock.close()
            return None
        return sock

    socks: list[socket.socket] = []
    for start in range(0, count, 100):  # a hundred at a time: the listen backlog is about that
        batch = await asyncio.gather(*(one() for _ in range(min(100, count - start))))
        socks.extend(s for s in batch if s is not None)
    return socks


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
