"""The decision port's limits, flood budgets and RFC 9113 errors: raw frames over a socket to a UnaryServer
started here with small limits, the budget helper with a fake clock, and the `decision:` settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import hpack
import pytest
from prometheus_client import generate_latest

from quotagate.config import ConfigError, parse_settings
from quotagate.metrics import Metrics
from quotagate.server import DecisionMetrics
from quotagate.unary import Context, Method, UnaryServer
from quotagate.unary.frames import PREFACE, ErrorCode, Flag, FrameType, Setting, frame, settings_frame, window_update
from quotagate.unary.headers import BlockDecoder, HeaderBomb, table_size_updates
from quotagate.unary.limits import Budget, CauseLog, DecisionLimits, FloodBudgets

ECHO, WAIT = "/test.Echo/Echo", "/test.Echo/Wait"
END_HEADERS, END_STREAM = int(Flag.END_HEADERS), int(Flag.END_STREAM)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the pure helpers ---------------------------------------------------------------------------------------


def test_a_budget_allows_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    budget = Budget(rate=10.0, burst=5.0, clock=clock)
    assert all(budget.spend() for _ in range(5))
    assert not budget.spend()
    clock.now += 0.11  # one token back
    assert budget.spend()
    assert not budget.spend()
    clock.now += 100  # refilled to the burst, no further
    assert sum(budget.spend() for _ in range(10)) == 5


def test_the_cause_log_writes_one_line_per_cause_per_period_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    lines = CauseLog(logging.getLogger("test.causes"), clock, every=10.0)
    assert lines.closed("ping_flood", "x")
    assert not any(lines.closed("ping_flood", "x") for _ in range(500))
    assert lines.closed("rapid_reset", "y")  # another cause has its own line
    clock.now += 10
    assert lines.closed("ping_flood", "x")
    messages = [r.getMessage() for r in caplog.records if r.name == "test.causes"]
    assert len(messages) == 3
    assert "and 500 more" in messages[2]


def test_table_size_updates_are_counted_and_a_bomb_is_refused() -> None:
    assert table_size_updates(b"\x20\x3f\xe1\x1f\x82") == 2  # 0, then 4096 as a multi-byte integer
    decoder = BlockDecoder(lambda headers: list(headers))
    assert decoder.decode(b"\x20\x3f\xe1\x1f\x82") == [(b":method", b"GET")]
    with pytest.raises(HeaderBomb):
        decoder.decode(b"\x20" * 3 + b"\x82")
    # Many small fields are not a bomb: each decodes to more than it takes.
    assert BlockDecoder(len).decode(b"\x00\x01a\x00" * 1000) == 1000


def test_the_block_cache_is_bounded_in_bytes() -> None:
    decoder = BlockDecoder(lambda headers: list(headers))
    for i in range(3000):
        value = str(i).zfill(4).encode() * 25  # a literal field, not indexed: the table never changes
        decoder.decode(b"\x83\x00\x03x-n" + bytes((len(value),)) + value)
    assert 0 < decoder._known_bytes <= 64 << 10


# -- a server with small limits -----------------------------------------------------------------------------


@dataclass
class Seen:
    """The observer: what the server reported."""

    limits: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    open: list[int] = field(default_factory=list)

    def limit_hit(self, limit: str) -> None:
        self.limits.append(limit)

    def closed_for_cause(self, cause: str) -> None:
        self.causes.append(cause)

    def connections(self, open_connections: int) -> None:
        self.open.append(open_connections)


class Handlers:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0
        self.started = 0

    async def echo(self, request: bytes, context: Context) -> bytes:
        return request

    async def wait(self, request: bytes, context: Context) -> bytes:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"released"


SMALL = DecisionLimits(
    max_connections=4,
    max_concurrent_streams=8,
    max_header_list_bytes=4096,
    max_message_bytes=1 << 20,
    max_buffered_in_bytes=256 << 10,
    max_buffered_out_bytes=64 << 10,
    idle_timeout_seconds=30.0,
    header_read_timeout_seconds=30.0,
    floods=FloodBudgets(pings=(1.0, 20.0), settings=(1.0, 10.0), empty_frames=(1.0, 20.0), resets=(1.0, 20.0)),
)


@dataclass
class Served:
    server: UnaryServer
    port: int
    handlers: Handlers
    seen: Seen


async def _serve(limits: DecisionLimits) -> Served:
    handlers, seen = Handlers(), Seen()
    server = UnaryServer(limits=limits, observer=seen)
    server.add_method(ECHO, Method(bytes, handlers.echo, bytes))
    server.add_method(WAIT, Method(bytes, handlers.wait, bytes))
    return Served(server, await server.start("127.0.0.1", 0), handlers, seen)


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    limits = getattr(request, "param", SMALL)
    s = await _serve(limits)
    try:
        yield s
    finally:
        s.handlers.release.set()
        await s.server.stop(grace=1)


class Raw:
    """Frames out as built, frames in parsed; HEADERS decoded with the connection's HPACK state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: dict[Setting, int] | None = None, preface: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        if preface:
            writer.write(PREFACE + settings_frame(settings or {}))
        return raw

    def block(self, path: str, *extra: tuple[str, str]) -> bytes:
        return self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
             ("content-type", "application/grpc"), ("te", "trailers"), *extra]
        )  # fmt: skip

    def call(self, stream_id: int, path: str, body: bytes | None = None, *extra: tuple[str, str]) -> None:
        """HEADERS (and a message, ending the stream, unless `body` is None: the stream stays open)."""
        self.send(frame(FrameType.HEADERS, END_HEADERS, stream_id, self.block(path, *extra)))
        if body is not None:
            data = message(body)
            for at in range(0, len(data), 16384):
                last = at + 16384 >= len(data)
                self.send(frame(FrameType.DATA, END_STREAM if last else 0, stream_id, data[at : at + 16384]))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self, wait: float = 10) -> tuple[int, int, int, bytes] | None:
        """The next frame; None once the server has closed the connection."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), wait)
            payload = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head[:3], "big")), wait)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def until(self, kind: FrameType, stream_id: int | None = None, wait: float = 10) -> tuple[int, bytes]:
        """(flags, payload) of the next frame of `kind` (on `stream_id`); HEADERS decoded; fails if closed."""
        while True:
            got = await self.frame(wait)
            assert got is not None, f"closed before {kind.name}"
            k, flags, sid, payload = got
            if k == FrameType.HEADERS:
                payload = repr(dict(self.decoder.decode(payload))).encode()
            if k == kind and (stream_id is None or sid == stream_id):
                return flags, payload

    async def goaway(self, wait: float = 10) -> int:
        """The GOAWAY's error code, after reading to the close."""
        code = -1
        while (got := await self.frame(wait)) is not None:
            if got[0] == FrameType.GOAWAY:
                code = struct.unpack(">I", got[3][4:8])[0]
        return code

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


def rst_code(payload: bytes) -> int:
    return int(struct.unpack(">I", payload)[0])


@pytest.fixture
async def raw(served: Served) -> AsyncIterator[Raw]:
    client = await Raw.connect(served.port)
    try:
        yield client
    finally:
        await client.close()


# -- what is announced, and what is refused -----------------------------------------------------------------


async def test_settings_announce_the_stream_and_header_limits(raw: Raw) -> None:
    _, payload = await raw.until(FrameType.SETTINGS)
    values = dict(struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6))
    assert values[Setting.MAX_CONCURRENT_STREAMS] == 8
    assert values[Setting.MAX_HEADER_LIST_SIZE] == 4096


async def test_streams_past_the_limit_are_refused_and_counted(served: Served, raw: Raw) -> None:
    for i in range(9):
        raw.call(1 + 2 * i, WAIT, b"")
    _, payload = await raw.until(FrameType.RST_STREAM, 17)
    assert rst_code(payload) == ErrorCode.REFUSED_STREAM
    assert served.seen.limits == ["max_concurrent_streams"]
    served.handlers.release.set()
    flags = 0
    while not flags & END_STREAM:
        flags, trailers = await raw.until(FrameType.HEADERS, 15)
    assert b"grpc-status" in trailers and b"'0'" in trailers


async def test_an_unknown_method_is_answered_at_headers_time_with_a_short_message(raw: Raw) -> None:
    path = "/nope/" + "x" * 3000
    raw.call(1, path)  # no END_STREAM: grpcurl's reflection stream waits like this
    flags, trailers = await raw.until(FrameType.HEADERS, 1)
    assert flags & END_STREAM
    assert b"grpc-status" in trailers and b"'12'" in trailers
    assert len(trailers) < 400  # the path is quoted up to 64 characters, not echoed
    _, payload = await raw.until(FrameType.RST_STREAM, 1)
    assert rst_code(payload) == ErrorCode.NO_ERROR
    # DATA in flight after our RST_STREAM is ignored; the connection goes on.
    raw.send(frame(FrameType.DATA, END_STREAM, 1, message(b"late")))
    raw.call(3, ECHO, b"after")
    _, answer = await raw.until(FrameType.DATA, 3)
    assert answer == message(b"after")


async def test_grpcio_hears_unimplemented_on_a_stream_it_has_not_half_closed(served: Served) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        call: Any = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_data_on_an_idle_stream_is_a_connection_protocol_error(served: Served, raw: Raw) -> None:
    raw.send(frame(FrameType.DATA, 0, 5, message(b"x")))
    assert await raw.goaway() == ErrorCode.PROTOCOL_ERROR
    assert served.seen.causes == ["protocol_error"]


async def test_data_after_the_clients_end_of_stream_is_stream_closed(raw: Raw) -> None:
    raw.call(1, WAIT, b"")
    raw.send(frame(FrameType.DATA, 0, 1, message(b"more")))
    _, payload = await raw.until(FrameType.RST_STREAM, 1)
    assert rst_code(payload) == ErrorCode.STREAM_CLOSED
    raw.call(3, ECHO, b"still here")  # a stream error: the connection stays
    _, answer = await raw.until(FrameType.DATA, 3)
    assert answer == message(b"still here")


async def test_window_update_errors_follow_rfc_9113(served: Served, raw: Raw) -> None:
    raw.call(1, WAIT, b"")
    raw.call(3, WAIT, b"")
    assert await _eventually(lambda: served.handlers.started == 2)
    raw.send(window_update(1, 0))
    _, payload = await raw.until(FrameType.RST_STREAM, 1)
    assert rst_code(payload) == ErrorCode.PROTOCOL_ERROR
    raw.send(window_update(3, 2**31 - 1))
    _, payload = await raw.until(FrameType.RST_STREAM, 3)
    assert rst_code(payload) == ErrorCode.FLOW_CONTROL_ERROR
    assert await _eventually(lambda: served.handlers.cancelled == 2)
    raw.send(window_update(0, 0))
    assert await raw.goaway() == ErrorCode.PROTOCOL_ERROR


async def _eventually(check: Any, seconds: float = 5) -> bool:
    for _ in range(int(seconds / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


# -- floods -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flood", "cause"),
    [
        (frame(FrameType.PING, 0, 0, b"12345678"), "ping_flood"),
        (settings_frame({}), "settings_flood"),
    ],
)
async def test_control_frame_floods_end_with_enhance_your_calm(
    served: Served, raw: Raw, flood: bytes, cause: str
) -> None:
    raw.send(flood * 200)
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == [cause]


async def test_empty_continuation_frames_end_the_connection(served: Served, raw: Raw) -> None:
    block = raw.block(WAIT)
    raw.send(frame(FrameType.HEADERS, 0, 1, block[:4]))
    raw.send(frame(FrameType.CONTINUATION, 0, 1, b"") * 200)
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == ["empty_frames"]


async def test_empty_data_frames_end_the_connection(served: Served, raw: Raw) -> None:
    raw.call(1, WAIT)
    raw.send(frame(FrameType.DATA, 0, 1, b"") * 200)
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == ["empty_frames"]


async def test_rapid_reset_ends_the_connection(served: Served, raw: Raw) -> None:
    for i in range(100):
        stream_id = 1 + 2 * i
        raw.call(stream_id, WAIT, b"")
        raw.send(frame(FrameType.RST_STREAM, 0, stream_id, struct.pack(">I", ErrorCode.CANCEL)))
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == ["rapid_reset"]


async def test_a_header_block_of_table_size_updates_is_a_bomb(served: Served, raw: Raw) -> None:
    raw.send(frame(FrameType.HEADERS, END_HEADERS, 1, b"\x20" * 3000 + raw.block(WAIT)))
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == ["header_bomb"]


async def test_a_header_list_over_the_limit_ends_the_connection(served: Served, raw: Raw) -> None:
    raw.call(1, ECHO, b"", ("x-big", "v" * 5000))
    assert await raw.goaway() == ErrorCode.ENHANCE_YOUR_CALM
    assert served.seen.causes == ["max_header_list_bytes"]


# -- bytes held ---------------------------------------------------------------------------------------------


async def test_request_bytes_held_past_the_limit_refuse_the_stream(served: Served, raw: Raw) -> None:
    chunk = b"x" * 16000
    for stream_id in (1, 3):
        raw.call(stream_id, ECHO)
        raw.send(frame(FrameType.DATA, 0, stream_id, b"\x00" + struct.pack(">I", 900_000)))
    for _ in range(9):  # 144 KB on each stream, never finished: 288 KB over the 256 KiB held
        for stream_id in (1, 3):
            raw.send(frame(FrameType.DATA, 0, stream_id, chunk))
    # Stream 1's ninth chunk is the first past 256 KiB held.
    _, trailers = await raw.until(FrameType.HEADERS, 1)
    assert b"grpc-status" in trailers and b"'8'" in trailers
    _, payload = await raw.until(FrameType.RST_STREAM, 1)
    assert rst_code(payload) == ErrorCode.NO_ERROR
    assert served.seen.limits == ["max_buffered_in_bytes"]


async def test_a_zero_window_peer_gets_no_new_streams_past_the_answer_bytes_limit(served: Served) -> None:
    raw = await Raw.connect(served.port, {Setting.INITIAL_WINDOW_SIZE: 0})
    try:
        payload = b"y" * 20_000
        for i in range(5):  # 100 KB of answers held by a zero window: over 64 KiB
            raw.call(1 + 2 * i, ECHO, payload)
        await asyncio.sleep(0.2)  # answered, and held back by the window
        raw.call(11, ECHO, payload)
        _, code = await raw.until(FrameType.RST_STREAM, 11)
        assert rst_code(code) == ErrorCode.REFUSED_STREAM
        assert served.seen.limits == ["max_buffered_out_bytes"]
        # Once the peer opens its windows, the held answers leave.
        raw.send(settings_frame({Setting.INITIAL_WINDOW_SIZE: 1 << 20}))
        _, data = await raw.until(FrameType.DATA, 1)
        assert data == message(payload)[: len(data)]
    finally:
        await raw.close()


async def test_a_peer_that_never_reads_is_no_longer_read_and_is_closed_when_stalled() -> None:
    s = await _serve(replace(SMALL, max_concurrent_streams=100, idle_timeout_seconds=1.0))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", s.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = Raw(reader, writer)
    try:
        raw.send(PREFACE + settings_frame({Setting.INITIAL_WINDOW_SIZE: 1 << 24}) + window_update(0, 1 << 30))
        payload = b"z" * 16000
        for i in range(600):  # 9.6 MB of answers, never read
            raw.call(1 + 2 * i, ECHO, payload)
        (connection,) = s.server._connections
        assert await _eventually(lambda: connection._writing_paused)
        assert connection._transport is not None
        buffered = connection._transport.get_write_buffer_size()
        assert buffered < SMALL.max_buffered_out_bytes + 64 * 16000  # the high-water mark and one read's answers
        assert await _eventually(lambda: s.seen.causes == ["write_stalled"], 5)
    finally:
        writer.close()
        await s.server.stop(grace=1)


# -- time ---------------------------------------------------------------------------------------------------


async def test_an_idle_connection_is_told_goaway_no_error() -> None:
    s = await _serve(replace(SMALL, idle_timeout_seconds=0.3))
    try:
        raw = await Raw.connect(s.port)
        raw.call(1, ECHO, b"one")
        await raw.until(FrameType.DATA, 1)
        assert await raw.goaway(wait=5) == ErrorCode.NO_ERROR
        assert s.seen.causes == ["idle_timeout"]
        await raw.close()
    finally:
        await s.server.stop(grace=1)


async def test_header_read_timeouts_close_a_silent_peer_and_reset_an_unfinished_request() -> None:
    s = await _serve(replace(SMALL, header_read_timeout_seconds=0.3))
    try:
        silent = await Raw.connect(s.port, preface=False)
        assert await silent.goaway(wait=5) == ErrorCode.PROTOCOL_ERROR
        await silent.close()
        slow = await Raw.connect(s.port)
        slow.call(1, ECHO)
        slow.send(frame(FrameType.DATA, 0, 1, message(b"not finished")[:6]))
        _, payload = await slow.until(FrameType.RST_STREAM, 1, wait=5)
        assert rst_code(payload) == ErrorCode.CANCEL
        await slow.close()
        assert s.seen.limits == ["header_read_timeout", "header_read_timeout"]
    finally:
        await s.server.stop(grace=1)


async def test_grpc_timeout_cancels_the_handler_with_deadline_exceeded(served: Served, raw: Raw) -> None:
    raw.call(1, WAIT, b"", ("grpc-timeout", "100m"))
    _, trailers = await raw.until(FrameType.HEADERS, 1, wait=5)
    assert b"'4'" in trailers
    assert await _eventually(lambda: served.handlers.cancelled == 1)


async def test_connections_past_the_limit_are_told_goaway_and_closed(served: Served) -> None:
    clients = [await Raw.connect(served.port) for _ in range(4)]
    try:
        for client in clients:
            await client.until(FrameType.SETTINGS)
        extra = await Raw.connect(served.port)
        assert await extra.goaway(wait=5) == ErrorCode.ENHANCE_YOUR_CALM
        await extra.close()
        assert served.seen.causes == ["max_connections"]
        assert max(served.seen.open) == 4
    finally:
        for client in clients:
            await client.close()


# -- settings -----------------------------------------------------------------------------------------------


def test_the_decision_section_is_read_into_decision_limits() -> None:
    settings = parse_settings(
        {"decision": {"max_connections": 64, "idle_timeout_seconds": 60, "max_buffered_out_bytes": 1 << 18}},
        "quotagate.yaml",
        {},
    )
    assert settings.decision_limits.max_connections == 64
    assert settings.decision_limits.idle_timeout_seconds == 60.0
    assert settings.decision_limits.max_buffered_out_bytes == 1 << 18
    assert settings.decision_limits.max_concurrent_streams == DecisionLimits().max_concurrent_streams
    assert parse_settings({}, "q.yaml", {}).decision_limits == DecisionLimits()
    with pytest.raises(ConfigError, match=r"decision\.max_connections: must be at least 1"):
        parse_settings({"decision": {"max_connections": 0}}, "q.yaml", {})
    with pytest.raises(ConfigError, match=r"decision\.header_read_timeout_seconds: must be positive"):
        parse_settings({"decision": {"header_read_timeout_seconds": 0}}, "q.yaml", {})
    with pytest.raises(ConfigError, match=r"decision\.max_streams: unknown key"):
        parse_settings({"decision": {"max_streams": 5}}, "q.yaml", {})


def test_the_composition_roots_observer_counts_in_prometheus() -> None:
    metrics = Metrics()
    observer = DecisionMetrics(metrics)
    observer.limit_hit("max_connections")
    observer.closed_for_cause("ping_flood")
    observer.closed_for_cause("ping_flood")
    observer.connections(3)
    text = generate_latest(metrics.registry).decode()
    assert 'quotagate_decision_limit_hits_total{limit="max_connections"} 1.0' in text
    assert 'quotagate_decision_connections_closed_total{cause="ping_flood"} 2.0' in text
    assert "quotagate_decision_connections 3.0" in text
