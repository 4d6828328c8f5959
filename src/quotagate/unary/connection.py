"""One HTTP/2 connection of the unary server: frames in, calls dispatched, answers out.

Written for Envoy's gRPC client (and any other conforming one): the server opens no streams, and everything
written in one event-loop turn leaves in one write (a unary answer's HEADERS, DATA and trailers, and the
answers that complete together). What it sends follows the peer's flow-control windows; its own receive
windows are wide open: a unary request is capped at `max_message_bytes`, far below the per-stream window
announced, and a stream's window is widened again as its handler reads its messages. A call the peer resets
(RST_STREAM, e.g. Envoy's timeout or the end of an ext_proc exchange) has its handler cancelled.

What a peer may take is bounded (limits.py): concurrent streams, header lists, request bytes held, answer bytes
waiting for it (past the transport's high-water mark, reading stops; past the limit in answers its windows hold
back, new streams are refused), the time to send a preface, a header block or a unary request, the time with no
stream open, and token buckets for the frames that cost work without carrying a call (PING, SETTINGS, empty
frames, resets, header bombs). Past a bucket the connection ends with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import hpack
from grpc.aio import EOF

from quotagate.unary.calls import Abort, Context, Metadata, Method, StreamContext
from quotagate.unary.frames import (
    ACK,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    PREFACE,
    RESPONSE_HEADERS,
    ErrorCode,
    Flag,
    FrameType,
    ProtocolViolation,
    Setting,
    Status,
    complete_frames,
    frame,
    goaway,
    literal,
    parse_settings,
    rst_stream,
    settings_frame,
    strip_padding,
    trailers,
    window_update,
)
from quotagate.unary.headers import BlockDecoder, HeaderBomb, Headers
from quotagate.unary.limits import Budget, CauseLog, DecisionLimits, NullObserver, Observer

log = logging.getLogger("quotagate.unary")

# Our receive side: each stream may send this much before a WINDOW_UPDATE, more than any request we accept.
STREAM_WINDOW = 1 << 24
QUOTED_INPUT = 64  # characters of client input (a path) a status message quotes
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}
_SHUTDOWN_PING = b"qg-stop!"
_TOP_UP_AT = 1 << 30  # consumed bytes of the connection window before it is widened again
_STREAM_TOP_UP_AT = 1 << 20  # bytes a stream's handler has read before its window is widened again
_END_HEADERS = int(Flag.END_HEADERS)
_END_STREAM = int(Flag.END_STREAM)
_CLOSING = _END_STREAM | _END_HEADERS
# ":status: 415", its name from static table entry 8, then "content-type: text/plain".
_NOT_GRPC = b"\x08\x03415" + literal(b"content-type", b"text/plain")


class _Headers(NamedTuple):
    path: str
    grpc: bool
    metadata: Metadata
    timeout: float | None  # grpc-timeout, in seconds


def _grpc_timeout(value: bytes) -> float | None:
    """grpc-timeout's value ("200m", "5S": at most 8 digits and a unit) in seconds; None when it is not one."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def quoted(text: str) -> str:
    """Client input as a status message may quote it: at most QUOTED_INPUT characters."""
    return text if len(text) <= QUOTED_INPUT else text[:QUOTED_INPUT] + "..."


def _decode_message(method: Method, compressed: int, data: bytes) -> Any:
    """One request message; Abort with the status the call ends with when it cannot be read."""
    if compressed:
        raise Abort(Status.UNIMPLEMENTED, "compressed messages are not supported")
    try:
        return method.deserialize(data)
    except Exception as exc:  # whatever the protobuf runtime raises for bytes it cannot read
        raise Abort(Status.INVALID_ARGUMENT, f"malformed request: {type(exc).__name__}: {exc}"[:200]) from None


def _parse_headers(headers: Headers) -> _Headers:
    path, grpc, metadata, timeout = "", False, [], None
    for name, value in headers:
        if name == b":path":
            path = value.decode("utf-8", "replace")
        elif name == b"content-type":
            grpc = value.startswith(b"application/grpc")
        elif not name.startswith(b":"):
            metadata.append((name, value))
            if name == b"grpc-timeout":
                timeout = _grpc_timeout(value)
    return _Headers(path, grpc, tuple(metadata), timeout)


class _Stream:
    __slots__ = (
        "body", "client_ended", "deadline", "drained", "finished", "headers", "headers_sent", "held", "id", "inbox",
        "method", "opened", "path", "pending", "reader", "receiving", "send_window", "tail", "task", "unacked",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int, opened: float) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.opened = opened
        self.body = bytearray()  # request bytes not yet parsed into messages
        self.held = 0  # request bytes of this stream counted in the connection's max_buffered_in_bytes
        self.client_ended = False  # the client's END_STREAM came (frames after it are STREAM_CLOSED)
        self.deadline: asyncio.TimerHandle | None = None  # grpc-timeout
        self.headers: Metadata = ()
        self.method: Method | None = None
        self.path = ""
        self.receiving = True  # until the client's END_STREAM, or until the request is no longer wanted
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.finished = False  # the status is decided (sent, or waiting behind `pending`)
        self.pending = b""  # DATA held back by the peer's flow-control windows
        self.tail = b""  # the trailers that follow it
        self.drained: asyncio.Future[None] | None = None  # a writer waiting for `pending` to leave
        # Streaming methods: parsed messages with their size on the wire, the reader waiting for one, and the
        # bytes read since the stream's window was last widened.
        self.inbox: deque[tuple[Any, int]] = deque()
        self.reader: asyncio.Future[None] | None = None
        self.unacked = 0


class _StreamIO:
    """StreamContext's access to its stream on this connection."""

    __slots__ = ("_connection", "_stream")

    def __init__(self, connection: Connection, stream: _Stream) -> None:
        self._connection, self._stream = connection, stream

    async def read(self) -> Any:
        return await self._connection.read_message(self._stream)

    async def write(self, payload: bytes) -> None:
        await self._connection.write_message(self._stream, payload)


class Connection(asyncio.Protocol):
    def __init__(
        self,
        methods: Mapping[str, Method],
        limits: DecisionLimits,
        on_close: Callable[[Connection], None],
        observer: Observer | None = None,
        cause_log: CauseLog | None = None,
    ) -> None:
        self._methods = methods
        self._limits = limits
        self._max_message = limits.max_message_bytes
        self._on_close = on_close
        self._observer: Observer = observer or NullObserver()
        self._loop = asyncio.get_running_loop()
        self._cause_log = cause_log or CauseLog(log, self._loop.time)
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        floods = limits.floods
        self._headers = BlockDecoder(
            _parse_headers, limits.max_header_list_bytes, floods.max_table_size_updates, floods.bomb_ratio,
            floods.bomb_floor,
        )  # fmt: skip
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._block: tuple[int, int, bytearray] | None = None  # (stream, HEADERS flags, fragments) until END_HEADERS
        self._send_window = DEFAULT_WINDOW
        self._peer_window = DEFAULT_WINDOW
        self._peer_frame = DEFAULT_MAX_FRAME
        self._received = 0
        self._blocked: list[_Stream] = []
        self._out: list[bytes] = []
        self._flushing = False
        self._accept_up_to: int | None = None  # set by the final GOAWAY
        self._going_away = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # Limits and budgets.
        clock = self._loop.time
        self._pings = Budget(*floods.pings, clock)
        self._settings = Budget(*floods.settings, clock)
        self._empties = Budget(*floods.empty_frames, clock)
        self._resets = Budget(*floods.resets, clock)
        self._stream_errors = Budget(*floods.stream_errors, clock)
        self._held_in = 0  # request bytes held: bodies not yet dispatched, messages not yet read
        self._held_out = 0  # answer bytes held back by the peer's flow-control windows
        self._writing_paused = False  # the transport's buffer is over its high-water mark: reading stops
        self._closing = False  # GOAWAY for a cause sent: nothing more is read
        # Streams we ended (answer or RST_STREAM) while the client was still sending: its frames in flight are
        # ignored, as RFC 9113 5.1 allows; a stream the client itself ended is STREAM_CLOSED to it.
        self._ended_by_us: dict[int, None] = {}
        # A clock for the hot path, updated by each _tick (a fraction of the shortest timeout): streams are
        # stamped with it instead of reading the time on every call.
        self._now = now = self._loop.time()
        self._opened_at = self._active_at = self._progress_at = now
        self._max_streams = limits.max_concurrent_streams
        self._max_in, self._max_out = limits.max_buffered_in_bytes, limits.max_buffered_out_bytes
        self._block_started = now
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._tick_every = min(1.0, limits.header_read_timeout_seconds / 4, limits.idle_timeout_seconds / 4)

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Past the high-water mark pause_writing stops reading from a peer that does not read its answers.
        out = self._limits.max_buffered_out_bytes
        transport.set_write_buffer_limits(high=out, low=out // 4)
        transport.write(
            settings_frame(
                {
                    Setting.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
                    Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                    Setting.MAX_HEADER_LIST_SIZE: self._limits.max_header_list_bytes,
                }
            )
            + window_update(0, MAX_WINDOW - DEFAULT_WINDOW)
        )
        self._timer = self._loop.call_later(self._tick_every, self._tick)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._receive(data)
        except ProtocolViolation as exc:
            self._fail(exc.code, str(exc), exc.cause)
        except HeaderBomb as exc:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, str(exc), "header_bomb")
        except hpack.OversizedHeaderListError:
            self._observer.limit_hit("max_header_list_bytes")
            reason = f"header list over {self._limits.max_header_list_bytes} bytes"
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, reason, "max_header_list_bytes")
        except hpack.HPACKError as exc:
            self._fail(ErrorCode.COMPRESSION_ERROR, f"header block: {type(exc).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for handle in (self._timer, self._abort_timer):
            if handle is not None:
                handle.cancel()
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
            if stream.deadline is not None:
                stream.deadline.cancel()
        self._streams.clear()
        self._blocked.clear()
        self._held_in = self._held_out = 0
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_close(self)

    def pause_writing(self) -> None:
        # The peer does not read what we send: stop reading what it asks until it does.
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._progress_at = self._loop.time()
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    # -- shutdown -----------------------------------------------------------------------------------------

    def go_away(self) -> None:
        """Graceful close: a first GOAWAY and a PING; when the PING comes back, a GOAWAY with the last stream
        taken, and the connection closes once those calls are answered."""
        if self._going_away or self._transport is None:
            return
        self._going_away = True
        self._write(goaway(MAX_WINDOW, ErrorCode.NO_ERROR) + frame(FrameType.PING, 0, 0, _SHUTDOWN_PING))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, code: ErrorCode, reason: str, cause: str = "") -> None:
        """Ends the connection for a cause: GOAWAY with `code`, counted and logged (rate-limited)."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        cause = cause or code.name.lower()
        self._observer.closed_for_cause(cause)
        if cause != "idle_timeout":
            self._cause_log.closed(cause, f"{reason} ({code.name})")
        transport = self._transport
        self._flush()
        transport.write(goaway(self._last_stream_id, code, reason))
        if transport.get_write_buffer_size() > self._limits.max_buffered_out_bytes:
            transport.abort()  # the peer does not read: the GOAWAY would never leave
            return
        transport.close()
        # close() waits for the buffer to drain: a peer that stops reading now is cut off after the timeout.
        self._abort_timer = self._loop.call_later(self._limits.header_read_timeout_seconds, transport.abort)

    def _close_if_done(self) -> None:
        if self._accept_up_to is not None and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

    def _tick(self) -> None:
        """The connection's timeouts, checked a few times a second: preface, header block, unary request
        bodies, idle, and a peer that has not taken its answers for the idle timeout."""
        self._timer = None
        if self._transport is None or self._closing:
            return
        limits = self._limits
        self._now = now = self._loop.time()
        read_timeout = limits.header_read_timeout_seconds
        if not self._preface and now - self._opened_at > read_timeout:
            self._observer.limit_hit("header_read_timeout")
            self._fail(ErrorCode.PROTOCOL_ERROR, "no connection preface in time", "header_read_timeout")
            return
        if self._block is not None and now - self._block_started > read_timeout:
            self._observer.limit_hit("header_read_timeout")
            self._fail(ErrorCode.PROTOCOL_ERROR, "header block not finished in time", "header_read_timeout")
            return
        for stream in list(self._streams.values()):
            unary = stream.method is None or not stream.method.streaming
            if unary and not stream.client_ended and now - stream.opened > read_timeout:
                self._observer.limit_hit("header_read_timeout")
                self._reset_stream(stream, ErrorCode.CANCEL, budget=False)
        if not self._streams and now - self._active_at > limits.idle_timeout_seconds:
            self._fail(ErrorCode.NO_ERROR, "idle", "idle_timeout")
            return
        if not (self._held_out or self._writing_paused):
            self._progress_at = now
        elif now - self._progress_at > limits.idle_timeout_seconds:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "answers not taken", "write_stalled")
            return
        self._timer = self._loop.call_later(self._tick_every, self._tick)

    # -- frames in ----------------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if buf[: len(PREFACE)] != PREFACE:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del buf[: len(PREFACE)]
            self._preface = True
        for kind, flags, stream_id, payload in complete_frames(buf, DEFAULT_MAX_FRAME):
            if self._closing:
                return  # failed while handling an earlier frame of this read
            if self._block is not None and (kind != FrameType.CONTINUATION or stream_id != self._block[0]):
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            if kind == FrameType.DATA:
                self._on_data(flags, stream_id, payload)
            elif kind == FrameType.HEADERS:
                self._on_headers(flags, stream_id, payload)
            elif kind == FrameType.WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == FrameType.SETTINGS:
                self._on_settings(flags, stream_id, payload)
            elif kind == FrameType.PING:
                self._on_ping(flags, stream_id, payload)
            elif kind == FrameType.RST_STREAM:
                self._on_reset(stream_id, payload)
            elif kind == FrameType.CONTINUATION:
                self._on_continuation(flags, stream_id, payload)
            elif kind == FrameType.GOAWAY:
                self.go_away()  # the peer leaves: answer what it sent, then close
            elif kind == FrameType.PUSH_PROMISE:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _check_block_size(self, size: int) -> None:
        if size > self._limits.max_header_block_bytes:
            self._observer.limit_hit("max_header_list_bytes")
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "header block too large", "max_header_list_bytes")

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        fragment = strip_padding(flags, payload, priority=True)
        self._check_block_size(len(fragment))
        if flags & _END_HEADERS:
            self._on_header_block(flags, stream_id, fragment)
        else:
            self._block = (stream_id, flags, bytearray(fragment))
            self._block_started = self._loop.time()

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        end = flags & _END_HEADERS
        if not end and len(payload) < self._limits.floods.tiny_frame_bytes and not self._empties.spend():
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "empty CONTINUATION frames", "empty_frames")
        _, first_flags, block = self._block
        block += payload
        self._check_block_size(len(block))
        if end:
            self._block = None
            self._on_header_block(first_flags, stream_id, bytes(block))

    def _on_header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        headers = self._headers.decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: only the end of the request matters
            if flags & _END_STREAM and not stream.client_ended:
                self._client_ended(stream)
            return
        if stream_id <= self._last_stream_id:
            if stream_id in self._ended_by_us:
                return  # trailers in flight after our RST_STREAM
            raise ProtocolViolation(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
        self._last_stream_id = stream_id
        if self._accept_up_to is not None and stream_id > self._accept_up_to:
            self._refuse(stream_id)
            return
        if len(self._streams) >= self._max_streams:
            self._observer.limit_hit("max_concurrent_streams")
            self._refuse(stream_id)
            self._count_reset()  # opening streams past the limit is a way to rapid reset too
            return
        if self._held_out > self._max_out:
            self._observer.limit_hit("max_buffered_out_bytes")
            self._refuse(stream_id)
            return
        stream = _Stream(stream_id, self._peer_window, self._now)
        stream.path, stream.headers = headers.path, headers.metadata
        self._streams[stream_id] = stream
        if flags & _END_STREAM:
            stream.client_ended = True
        if not headers.grpc:
            self._answer(stream, frame(FrameType.HEADERS, _CLOSING, stream_id, _NOT_GRPC))
            return
        method = stream.method = self._methods.get(stream.path)
        if method is None:  # answered now: a client waiting to half-close (grpcurl list) hears it at once
            self._finish(stream, Status.UNIMPLEMENTED, f"unknown method {quoted(stream.path)}")
            return
        if headers.timeout is not None:
            stream.deadline = self._loop.call_later(headers.timeout, self._deadline_passed, stream)
        if method.streaming:
            context = StreamContext(stream.headers, _StreamIO(self, stream), method.serialize)
            stream.task = self._loop.create_task(self._call_stream(stream, method, context))
        if flags & _END_STREAM:
            self._end_of_request(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        # All DATA counts against the connection window, whatever becomes of it.
        self._received += len(payload)
        if self._received >= _TOP_UP_AT:
            self._write(window_update(0, self._received))
            self._received = 0
        if stream_id == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        content = strip_padding(flags, payload)
        end = flags & _END_STREAM
        if not content and not end and not self._empties.spend():
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "empty DATA frames", "empty_frames")
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id or stream_id % 2 == 0:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            if stream_id not in self._ended_by_us:
                self._stream_error(stream_id, ErrorCode.STREAM_CLOSED)
            return  # else in flight after our own RST_STREAM or END_STREAM: ignored
        if stream.client_ended:
            self._reset_stream(stream, ErrorCode.STREAM_CLOSED)
            return
        if end:
            stream.client_ended = True
        if not stream.receiving:
            return  # the request is no longer wanted (already answered): its data is dropped
        if content:
            size = len(content)
            if self._held_in + size > self._max_in:
                self._observer.limit_hit("max_buffered_in_bytes")
                self._abort_stream(stream, Status.RESOURCE_EXHAUSTED, f"over {self._max_in} request bytes held")
                return
            stream.body += content
            stream.held += size
            self._held_in += size
        method = stream.method
        if method is not None and method.streaming:
            self._parse_messages(stream, method)
            if end and stream.receiving:
                self._end_of_request(stream)
        elif len(stream.body) > self._max_message + 5:
            self._observer.limit_hit("max_message_bytes")
            self._finish(stream, Status.RESOURCE_EXHAUSTED, f"request larger than {self._max_message} bytes")
        elif end:
            self._end_of_request(stream)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                if stream_id > self._last_stream_id:
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
                return  # a closed stream: allowed, ignored
            if increment == 0:
                self._reset_stream(stream, ErrorCode.PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self._reset_stream(stream, ErrorCode.FLOW_CONTROL_ERROR)
                return
        if self._blocked:
            self._progress_at = self._loop.time()
            self._drain()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if not self._settings.spend():
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "SETTINGS flood", "settings_flood")
        for key, value in parse_settings(payload):
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:  # RFC 9113 6.9.2
                        raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"max frame size {value}")
                self._peer_frame = value
        self._write(frame(FrameType.SETTINGS, ACK, 0))
        if self._blocked:
            self._drain()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if not flags & ACK:
            if not self._pings.spend():
                raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "PING flood", "ping_flood")
            self._write(frame(FrameType.PING, ACK, 0, payload))
        elif payload == _SHUTDOWN_PING and self._accept_up_to is None:
            self._accept_up_to = self._last_stream_id
            self._write(goaway(self._last_stream_id, ErrorCode.NO_ERROR))
            self._close_if_done()

    def _on_reset(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if stream_id == 0 or stream_id > self._last_stream_id:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.task is not None:
            stream.task.cancel()
        self._forget(stream)
        # Only a stream reset before any of its answer counts: Envoy resets every ext_proc stream once it has
        # the last answer, many a second, and that is no flood.
        if not stream.headers_sent:
            self._count_reset()

    def _count_reset(self) -> None:
        """A stream the client gave up on before its answer (CVE-2023-44487, rapid reset), within a budget."""
        if not self._resets.spend():
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "streams reset too fast", "rapid_reset")

    # -- streams: opened, held, ended ----------------------------------------------------------------------

    def _refuse(self, stream_id: int) -> None:
        self._write(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
        self._remember_ended(stream_id)

    def _remember_ended(self, stream_id: int) -> None:
        ended = self._ended_by_us
        ended[stream_id] = None
        if len(ended) > 2 * self._limits.max_concurrent_streams + 64:
            del ended[next(iter(ended))]

    def _stream_error(self, stream_id: int, code: ErrorCode, budget: bool = True) -> None:
        """RST_STREAM for a stream error (RFC 9113 5.4.2); so many that they flood end the connection."""
        if budget and not self._stream_errors.spend():
            raise ProtocolViolation(code, f"stream errors on stream {stream_id} and others")
        self._write(rst_stream(stream_id, code))
        self._remember_ended(stream_id)

    def _reset_stream(self, stream: _Stream, code: ErrorCode, budget: bool = True) -> None:
        """Ends an open stream with RST_STREAM `code` (a stream error, or a request not finished in time)."""
        if stream.task is not None:
            stream.task.cancel()
        stream.client_ended = False  # frames in flight after our RST_STREAM are ignored
        self._forget(stream)
        self._stream_error(stream.id, code, budget)

    def _release(self, stream: _Stream, size: int) -> None:
        stream.held -= size
        self._held_in -= size

    def _forget(self, stream: _Stream) -> None:
        """The stream is closed: everything it held is let go."""
        if self._streams.pop(stream.id, None) is None:
            return
        if stream.held:  # a handler may outlive its stream: what it held goes now
            self._release(stream, stream.held)
            stream.body = bytearray()
            stream.inbox.clear()
        if stream.pending:
            self._held_out -= len(stream.pending)
            stream.pending = b""
            if stream in self._blocked:
                self._blocked.remove(stream)
        if stream.deadline is not None:
            stream.deadline.cancel()
        if not stream.client_ended:
            self._remember_ended(stream.id)
        if not self._streams:
            self._active_at = self._now
            self._close_if_done()

    def _deadline_passed(self, stream: _Stream) -> None:
        stream.deadline = None
        if self._streams.get(stream.id) is not stream:
            return
        if stream.task is not None:
            stream.task.cancel()
        self._finish(stream, Status.DEADLINE_EXCEEDED, "deadline exceeded")

    # -- calls --------------------------------------------------------------------------------------------

    def _client_ended(self, stream: _Stream) -> None:
        stream.client_ended = True
        if stream.receiving:
            self._end_of_request(stream)

    def _end_of_request(self, stream: _Stream) -> None:
        """The client sent its last: a unary request is parsed and its handler started; a stream's reader is
        told."""
        stream.receiving = False
        method = stream.method
        if method is None:
            self._finish(stream, Status.UNIMPLEMENTED, f"unknown method {quoted(stream.path)}")
        elif method.streaming:
            if stream.body:
                self._abort_stream(stream, Status.INVALID_ARGUMENT, "malformed request: a message cut short")
            self._wake_reader(stream)
        else:
            self._dispatch(stream, method)

    def _dispatch(self, stream: _Stream, method: Method) -> None:
        body = stream.body
        if len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
            self._finish(stream, Status.INVALID_ARGUMENT, "malformed request: expected exactly one message")
            return
        try:
            request = _decode_message(method, body[0], bytes(body[5:]))
        except Abort as bad:
            self._finish(stream, bad.status, bad.details)
            return
        stream.body = bytearray()
        self._held_in -= stream.held
        stream.held = 0
        stream.task = self._loop.create_task(self._call(stream, method, request))

    async def _call(self, stream: _Stream, method: Method, request: Any) -> None:
        try:
            payload = method.serialize(await method.handle(request, Context(stream.headers)))
        except Abort as abort:
            self._finish(stream, abort.status, abort.details)
            return
        except Exception:
            log.exception("unexpected error in %s", stream.path)
            self._finish(stream, Status.INTERNAL, "internal error; see the quotagate log")
            return
        self._send(stream, payload)
        self._finish(stream, Status.OK, "")

    async def _call_stream(self, stream: _Stream, method: Method, context: StreamContext) -> None:
        try:
            await method.handle(context.messages(), context)
        except Abort as abort:
            self._finish(stream, abort.status, abort.details)
        except Exception:
            log.exception("unexpected error in %s", stream.path)
            self._finish(stream, Status.INTERNAL, "internal error; see the quotagate log")
        else:
            self._finish(stream, Status.OK, "")

    # -- streams: messages in and out ---------------------------------------------------------------------

    def _parse_messages(self, stream: _Stream, method: Method) -> None:
        """Moves the complete messages of a streaming call from its bytes to its inbox."""
        body = stream.body
        while len(body) >= 5:
            length = int.from_bytes(body[1:5], "big")
            if length > self._max_message:
                self._observer.limit_hit("max_message_bytes")
                self._abort_stream(stream, Status.RESOURCE_EXHAUSTED, f"message larger than {self._max_message} bytes")
                return
            if len(body) < 5 + length:
                break
            compressed, data = body[0], bytes(body[5 : 5 + length])
            del body[: 5 + length]
            try:
                message = _decode_message(method, compressed, data)
            except Abort as bad:
                self._abort_stream(stream, bad.status, bad.details)
                return
            stream.inbox.append((message, 5 + length))
        self._wake_reader(stream)

    def _wake_reader(self, stream: _Stream) -> None:
        reader = stream.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _abort_stream(self, stream: _Stream, status: Status, details: str) -> None:
        stream.receiving = False
        if stream.task is not None:
            stream.task.cancel()
        self._finish(stream, status, details)

    async def read_message(self, stream: _Stream) -> Any:
        """The stream's next message, or grpc.aio.EOF after its last."""
        while not stream.inbox:
            if not stream.receiving:
                return EOF
            stream.reader = self._loop.create_future()
            try:
                await stream.reader
            finally:
                stream.reader = None
        message, size = stream.inbox.popleft()
        self._release(stream, size)
        # The peer may send as much as the handler has read: the window moves with the reading, not the receipt.
        stream.unacked += size
        if stream.unacked >= _STREAM_TOP_UP_AT and stream.receiving:
            self._write(window_update(stream.id, stream.unacked))
            stream.unacked = 0
        return message

    async def write_message(self, stream: _Stream, payload: bytes) -> None:
        """Sends one message of a stream's answer, and waits while the peer's windows hold it back."""
        self._send(stream, payload)
        if stream.pending and self._streams.get(stream.id) is stream:
            stream.drained = self._loop.create_future()
            try:
                await stream.drained
            finally:
                stream.drained = None

    # -- answers ------------------------------------------------------------------------------------------

    def _send(self, stream: _Stream, payload: bytes) -> None:
        """One message of the answer: the answer's headers first, then DATA as the windows allow."""
        if self._streams.get(stream.id) is not stream or stream.finished:
            return  # reset, disconnected or already ended
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(frame(FrameType.HEADERS, _END_HEADERS, stream.id, RESPONSE_HEADERS))
        message = b"\x00" + len(payload).to_bytes(4, "big") + payload
        size = len(message)
        fits = size <= self._send_window and size <= stream.send_window and size <= self._peer_frame
        if fits and not stream.pending:
            self._send_window -= size
            stream.send_window -= size
            self._write(frame(FrameType.DATA, 0, stream.id, message))
            return
        stream.pending += message
        self._held_out += size
        if stream not in self._blocked:
            self._blocked.append(stream)
        self._drain()

    def _finish(self, stream: _Stream, status: Status, details: str) -> None:
        """Ends the answer with this status: trailers after the messages, or alone (trailers-only)."""
        if self._streams.get(stream.id) is not stream or stream.finished:
            return
        stream.finished = True
        if not stream.headers_sent:
            block = RESPONSE_HEADERS + trailers(status, details)
            self._answer(stream, frame(FrameType.HEADERS, _CLOSING, stream.id, block))
            return
        tail = frame(FrameType.HEADERS, _CLOSING, stream.id, trailers(status, details))
        if stream.pending:
            stream.tail = tail  # sent by _drain after the last of the messages
        else:
            self._answer(stream, tail)

    def _answer(self, stream: _Stream, frames: bytes) -> None:
        """Sends the end of a stream's answer and forgets the stream."""
        if not stream.client_ended:  # answered before the request ended: the rest of it is not wanted
            frames += rst_stream(stream.id, ErrorCode.NO_ERROR)
        if stream.receiving:
            stream.receiving = False
            self._wake_reader(stream)
        self._write(frames)
        self._forget(stream)

    def _drain(self) -> None:
        """Sends what the flow-control windows now allow of the answers held back."""
        for stream in list(self._blocked):
            while stream.pending and self._send_window > 0 and stream.send_window > 0:
                size = min(len(stream.pending), self._send_window, stream.send_window, self._peer_frame)
                chunk, stream.pending = stream.pending[:size], stream.pending[size:]
                self._held_out -= size
                self._send_window -= size
                stream.send_window -= size
                self._write(frame(FrameType.DATA, 0, stream.id, chunk))
            if stream.pending:
                continue
            self._blocked.remove(stream)
            if stream.drained is not None and not stream.drained.done():
                stream.drained.set_result(None)
            if stream.tail:
                self._answer(stream, stream.tail)

    # -- frames out ---------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        # Everything written in one turn of the event loop leaves in one write: answers that complete together
        # (one Redis reply wakes many calls) share a syscall.
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()
