"""One HTTP/2 connection of the unary server: frames in, calls dispatched, answers out.

Written for Envoy's gRPC client (and any other conforming one): the server opens no streams, and everything
written in one event-loop turn leaves in one write (a unary answer's HEADERS, DATA and trailers, and the
answers that complete together). What it sends follows the peer's flow-control windows; its own receive
windows are wide open: a unary request is capped at `max_message_bytes`, far below the per-stream window
announced, and a stream's window is widened again as its handler reads its messages. A call the peer resets
(RST_STREAM, e.g. Envoy's timeout or the end of an ext_proc exchange) has its handler cancelled.
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
from quotagate.unary.headers import BlockDecoder, Headers

log = logging.getLogger("quotagate.unary")

# Our receive side: each stream may send this much before a WINDOW_UPDATE, more than any request we accept.
STREAM_WINDOW = 1 << 24
MAX_STREAMS = 10_000
MAX_HEADER_LIST = 1 << 16
MAX_HEADER_BLOCK = 1 << 18
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


def _decode_message(method: Method, compressed: int, data: bytes) -> Any:
    """One request message; Abort with the status the call ends with when it cannot be read."""
    if compressed:
        raise Abort(Status.UNIMPLEMENTED, "compressed messages are not supported")
    try:
        return method.deserialize(data)
    except Exception as exc:  # whatever the protobuf runtime raises for bytes it cannot read
        raise Abort(Status.INVALID_ARGUMENT, f"malformed request: {type(exc).__name__}: {exc}"[:200]) from None


def _parse_headers(headers: Headers) -> _Headers:
    path, grpc, metadata = "", False, []
    for name, value in headers:
        if name == b":path":
            path = value.decode("utf-8", "replace")
        elif name == b"content-type":
            grpc = value.startswith(b"application/grpc")
        elif not name.startswith(b":"):
            metadata.append((name, value))
    return _Headers(path, grpc, tuple(metadata))


class _Stream:
    __slots__ = (
        "body", "drained", "finished", "headers", "headers_sent", "id", "inbox", "method", "path", "pending",
        "reader", "receiving", "send_window", "tail", "task", "unacked",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.body = bytearray()  # request bytes not yet parsed into messages
        self.headers: Metadata = ()
        self.method: Method | None = None
        self.path = ""
        self.receiving = True  # until the client's END_STREAM
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
        max_message_bytes: int,
        on_close: Callable[[Connection], None],
    ) -> None:
        self._methods = methods
        self._max_message = max_message_bytes
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        self._headers = BlockDecoder(_parse_headers, MAX_HEADER_LIST)
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

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(
            settings_frame(
                {
                    Setting.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                    Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                    Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                }
            )
            + window_update(0, MAX_WINDOW - DEFAULT_WINDOW)
        )

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except ProtocolViolation as exc:
            self._fail(exc.code, str(exc))
        except hpack.HPACKError as exc:
            self._fail(ErrorCode.COMPRESSION_ERROR, f"header block: {type(exc).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_close(self)

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

    def _fail(self, code: ErrorCode, reason: str) -> None:
        log.warning("HTTP/2 connection closed: %s (%s)", reason, code.name)
        if self._transport is not None:
            self._flush()
            self._transport.write(goaway(self._last_stream_id, code, reason))
            self._transport.close()

    def _close_if_done(self) -> None:
        if self._accept_up_to is not None and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

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
                self._on_reset(stream_id)
            elif kind == FrameType.CONTINUATION:
                self._on_continuation(flags, stream_id, payload)
            elif kind == FrameType.GOAWAY:
                self.go_away()  # the peer leaves: answer what it sent, then close
            elif kind == FrameType.PUSH_PROMISE:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        fragment = strip_padding(flags, payload, priority=True)
        if flags & _END_HEADERS:
            self._on_header_block(flags, stream_id, fragment)
        else:
            self._block = (stream_id, flags, bytearray(fragment))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        _, first_flags, block = self._block
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & _END_HEADERS:
            self._block = None
            self._on_header_block(first_flags, stream_id, bytes(block))

    def _on_header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        headers = self._headers.decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: only the end of the request matters
            if flags & _END_STREAM and stream.receiving:
                self._end_of_request(stream)
            return
        if stream_id <= self._last_stream_id:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"HEADERS on closed stream {stream_id}")
        self._last_stream_id = stream_id
        if (self._accept_up_to is not None and stream_id > self._accept_up_to) or len(self._streams) >= MAX_STREAMS:
            self._write(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        stream = _Stream(stream_id, self._peer_window)
        stream.path, stream.headers = headers.path, headers.metadata
        self._streams[stream_id] = stream
        if not headers.grpc:
            self._answer(stream, frame(FrameType.HEADERS, _CLOSING, stream_id, _NOT_GRPC))
            return
        method = stream.method = self._methods.get(stream.path)
        if method is not None and method.streaming:
            context = StreamContext(stream.headers, _StreamIO(self, stream), method.serialize)
            stream.task = self._loop.create_task(self._call_stream(stream, method, context))
        if flags & _END_STREAM:
            self._end_of_request(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._received += len(payload)
        if self._received >= _TOP_UP_AT:
            self._write(window_update(0, self._received))
            self._received = 0
        stream = self._streams.get(stream_id)
        if stream is None or not stream.receiving:
            return  # a stream already answered or reset: its data is dropped
        stream.body += strip_padding(flags, payload)
        method = stream.method
        if method is not None and method.streaming:
            self._parse_messages(stream, method)
            if flags & _END_STREAM and stream.receiving:
                self._end_of_request(stream)
        elif len(stream.body) > self._max_message + 5:
            stream.receiving = False
            self._finish(stream, Status.RESOURCE_EXHAUSTED, f"request larger than {self._max_message} bytes")
        elif flags & _END_STREAM:
            self._end_of_request(stream)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
        if self._blocked:
            self._drain()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        for key, value in parse_settings(payload):
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
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
            self._write(frame(FrameType.PING, ACK, 0, payload))
        elif payload == _SHUTDOWN_PING and self._accept_up_to is None:
            self._accept_up_to = self._last_stream_id
            self._write(goaway(self._last_stream_id, ErrorCode.NO_ERROR))
            self._close_if_done()

    def _on_reset(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.task is not None:
            stream.task.cancel()
        if stream in self._blocked:
            self._blocked.remove(stream)
        self._close_if_done()

    # -- calls --------------------------------------------------------------------------------------------

    def _end_of_request(self, stream: _Stream) -> None:
        """The client sent its last: a unary request is parsed and its handler started; a stream's reader is
        told."""
        stream.receiving = False
        method = stream.method
        if method is None:
            self._finish(stream, Status.UNIMPLEMENTED, f"unknown method {stream.path}")
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
        if stream.receiving:  # answered before the request ended: the rest of it is not wanted
            frames += rst_stream(stream.id, ErrorCode.NO_ERROR)
            stream.receiving = False
            self._wake_reader(stream)
        self._write(frames)
        self._streams.pop(stream.id, None)
        self._close_if_done()

    def _drain(self) -> None:
        """Sends what the flow-control windows now allow of the answers held back."""
        for stream in list(self._blocked):
            while stream.pending and self._send_window > 0 and stream.send_window > 0:
                size = min(len(stream.pending), self._send_window, stream.send_window, self._peer_frame)
                chunk, stream.pending = stream.pending[:size], stream.pending[size:]
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
