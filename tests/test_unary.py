"""The unary HTTP/2 server (quotagate.unary) against real peers: grpcio's own HTTP/2 client for unary calls and
reader/writer streams, and raw frames over a socket for what grpcio never sends (CONTINUATION, padding, tiny
windows, a wrong preface).

Envoy's side is covered by every end-to-end test, whose Envoy sends Check, ShouldRateLimit and ext_proc here
(harness.Stack sets decision_listen), by tests/test_ext_proc_streams.py, and by
test_envoy_calls_reach_the_unary_port below.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import hpack
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import CLIENT_KEY, ENVOY_AUTH, Stack, make_settings

from quotagate.envoyconf import AUTHZ_CLUSTER, EXTPROC_CLUSTER, RATELIMIT_CLUSTER
from quotagate.unary import Context, Method, Status, StreamContext, UnaryServer
from quotagate.unary.frames import PREFACE, ErrorCode, Flag, FrameType, frame, settings_frame, window_update
from quotagate.unary.frames import Setting as S

ECHO = "/test.Echo/Echo"
BIG_IN = [("grpc.max_receive_message_length", 8 << 20)]
BIG_OUT = [("grpc.max_send_message_length", 16 << 20)]


def _identity(data: bytes) -> bytes:
    return data


class Echo:
    """Handlers that show what the server did: echo, abort, fail, or wait until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.waiting = 0
        self.cancelled = 0
        self.metadata: list[tuple[str, str]] = []

    async def echo(self, request: bytes, context: Context) -> bytes:
        self.metadata = list(context.invocation_metadata())
        return request

    async def abort(self, request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, request.decode())
        raise AssertionError("abort returned")

    async def fail(self, request: bytes, context: Context) -> bytes:
        raise RuntimeError("a bug")

    async def wait(self, request: bytes, context: Context) -> bytes:
        self.waiting += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"released"


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[UnaryServer, int, Echo]]:
    echo = Echo()
    server = UnaryServer(max_message_bytes=4 << 20)
    for name, handler in (("Echo", echo.echo), ("Abort", echo.abort), ("Fail", echo.fail), ("Wait", echo.wait)):
        server.add_method(f"/test.Echo/{name}", Method(_identity, handler, _identity))
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port, echo
    finally:
        echo.release.set()
        await server.stop(grace=1)


def _call(channel: grpc.aio.Channel, name: str) -> Callable[..., Awaitable[bytes]]:
    return channel.unary_unary(f"/test.Echo/{name}", request_serializer=None, response_deserializer=None)  # type: ignore[no-any-return]


# -- grpcio as the client ---------------------------------------------------------------------------------


async def test_many_calls_at_once_on_one_connection_each_get_their_own_answer(
    echo_server: tuple[UnaryServer, int, Echo],
) -> None:
    _, port, _ = echo_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = _call(channel, "Echo")
        answers = await asyncio.gather(*(echo(f"call {i}".encode(), timeout=20) for i in range(300)))
    assert answers == [f"call {i}".encode() for i in range(300)]


async def test_large_messages_cross_frames_and_flow_control_windows_both_ways(
    echo_server: tuple[UnaryServer, int, Echo],
) -> None:
    _, port, _ = echo_server
    # 3 MiB: many 16 KiB DATA frames in, and an answer far over grpcio's initial 64 KiB receive window out.
    payload = bytes(range(256)) * (3 * 4096)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_IN) as channel:
        echo = _call(channel, "Echo")
        answers = await asyncio.gather(*(echo(payload, timeout=30) for _ in range(3)))
    assert all(answer == payload for answer in answers)


async def test_a_request_over_the_limit_is_resource_exhausted(echo_server: tuple[UnaryServer, int, Echo]) -> None:
    _, port, _ = echo_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_OUT) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, "Echo")(b"x" * (5 << 20), timeout=20)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than 4194304 bytes" in (raised.value.details() or "")
        # The connection goes on serving.
        assert await _call(channel, "Echo")(b"after", timeout=10) == b"after"


async def test_statuses_unknown_method_abort_with_any_text_and_a_bug(
    echo_server: tuple[UnaryServer, int, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    _, port, _ = echo_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/test.Echo/Nope")(b"", timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert raised.value.details() == "unknown method /test.Echo/Nope"

        text = "Sem cota: 100% usado, espere até 1º de dezembro\ttab"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, "Abort")(text.encode(), timeout=10)
        assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert raised.value.details() == text  # percent-encoded on the wire, decoded by grpcio

        with caplog.at_level(logging.ERROR, logger="quotagate.unary"), pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, "Fail")(b"", timeout=10)
        assert raised.value.code() is grpc.StatusCode.INTERNAL
        assert raised.value.details() == "internal error; see the quotagate log"
        assert any("unexpected error in /test.Echo/Fail" in r.getMessage() for r in caplog.records)


async def test_metadata_reaches_the_handler(echo_server: tuple[UnaryServer, int, Echo]) -> None:
    _, port, echo = echo_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await _call(channel, "Echo")(b"", metadata=(("authorization", "Bearer t"), ("x-trace", "7")), timeout=10)
    assert ("authorization", "Bearer t") in echo.metadata
    assert ("x-trace", "7") in echo.metadata
    assert not any(name.startswith(":") for name, _ in echo.metadata)


async def test_a_request_that_does_not_parse_is_invalid_argument() -> None:
    server = UnaryServer()
    server.add_method(
        "/envoy.service.auth.v3.Authorization/Check",
        Method(
            external_auth_pb2.CheckRequest.FromString, _never_called, external_auth_pb2.CheckResponse.SerializeToString
        ),
    )
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await check(b"\x0a\x05ab", timeout=10)  # a field that claims 5 bytes and has 2
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("malformed request: DecodeError")
    finally:
        await server.stop(grace=1)


async def _never_called(request: Any, context: Context) -> Any:
    raise AssertionError("the handler saw a request that does not parse")


async def test_a_call_the_client_gives_up_on_is_cancelled_in_the_server(
    echo_server: tuple[UnaryServer, int, Echo],
) -> None:
    _, port, echo = echo_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, "Wait")(b"", timeout=0.3)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if echo.cancelled:
                break
            await asyncio.sleep(0.02)
        assert (echo.waiting, echo.cancelled) == (1, 1)
        assert await _call(channel, "Echo")(b"still here", timeout=10) == b"still here"


async def _waiting_call() -> tuple[UnaryServer, int, Echo, grpc.aio.Channel, asyncio.Future[bytes]]:
    """A server of its own with one call in flight, its handler waiting for `echo.release`."""
    echo = Echo()
    server = UnaryServer()
    server.add_method("/test.Echo/Wait", Method(_identity, echo.wait, _identity))
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    in_flight = asyncio.ensure_future(_call(channel, "Wait")(b"", timeout=20))
    await asyncio.wait_for(echo.started.wait(), timeout=10)
    return server, port, echo, channel, in_flight


async def test_stop_lets_calls_in_flight_finish_and_takes_no_new_connection() -> None:
    server, port, echo, channel, in_flight = await _waiting_call()
    async with channel:
        stopping = asyncio.ensure_future(server.stop(grace=10))
        await asyncio.sleep(0.3)
        assert not stopping.done(), "stop() did not wait for the call in flight"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        echo.release.set()
        assert await in_flight == b"released"
        await asyncio.wait_for(stopping, timeout=5)


async def test_stop_closes_what_is_left_after_the_grace_period() -> None:
    server, _, echo, channel, in_flight = await _waiting_call()
    async with channel:
        await asyncio.wait_for(server.stop(grace=0.3), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await in_flight
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert echo.cancelled == 1


# -- streams (reader/writer style, as ext_proc's Process) ----------------------------------------------------


class Streams:
    """Stream handlers that read and write through the context, as ExternalProcessorService.Process does."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.seen: list[int] = []

    async def echo(self, requests: Any, context: StreamContext) -> None:
        """Answers every message with itself, until the client's last."""
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    async def count(self, requests: Any, context: StreamContext) -> None:
        """Reads everything, then answers with the number of bytes read."""
        total = 0
        async for message in requests:
            total += len(message)
        await context.write(str(total).encode())

    async def first_only(self, requests: Any, context: StreamContext) -> None:
        """Answers the first message and ends the call while the client still sends."""
        await context.write(await context.read())

    async def hold(self, requests: Any, context: StreamContext) -> None:
        try:
            await context.read()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def stream_server() -> AsyncIterator[tuple[int, Streams]]:
    handlers = Streams()
    server = UnaryServer(max_message_bytes=2 << 20)
    for name, handler in (
        ("Echo", handlers.echo),
        ("Count", handlers.count),
        ("FirstOnly", handlers.first_only),
        ("Hold", handlers.hold),
    ):
        server.add_method(f"/test.Streams/{name}", Method(_identity, handler, _identity, streaming=True))
    port = await server.start("127.0.0.1", 0)
    try:
        yield port, handlers
    finally:
        await server.stop(grace=1)


async def _read_only_good_messages(requests: Any, context: StreamContext) -> None:
    async for message in requests:
        assert isinstance(message, external_auth_pb2.CheckRequest)


def _stream(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.stream_stream(f"/test.Streams/{name}", request_serializer=None, response_deserializer=None)


async def test_a_stream_answers_each_message_in_turn(stream_server: tuple[int, Streams]) -> None:
    port, _ = stream_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _stream(channel, "Echo")()
        for n in range(50):
            await call.write(f"message {n}".encode())
            assert await call.read() == f"message {n}".encode()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK


async def test_a_stream_longer_than_its_window_keeps_flowing(stream_server: tuple[int, Streams]) -> None:
    port, _ = stream_server
    chunk = bytes(range(256)) * 4096  # 1 MiB
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _stream(channel, "Count")()
        for _ in range(40):  # 40 MiB through a stream whose first window is 16 MiB: the reader widens it
            await asyncio.wait_for(call.write(chunk), timeout=20)
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), timeout=20) == str(40 * len(chunk)).encode()
        assert await call.code() is grpc.StatusCode.OK


async def test_a_stream_that_ends_first_tells_the_client_ok(stream_server: tuple[int, Streams]) -> None:
    port, _ = stream_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _stream(channel, "FirstOnly")()
        await call.write(b"one")
        assert await call.read() == b"one"
        # The client never half-closed. (A second write racing the server's end is not sent here: grpc.aio's
        # client then reports its own failed write as INTERNAL, whatever status the server sent.)
        assert await asyncio.wait_for(call.code(), timeout=10) is grpc.StatusCode.OK


async def test_a_stream_the_client_cancels_is_cancelled_in_the_server(stream_server: tuple[int, Streams]) -> None:
    port, handlers = stream_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _stream(channel, "Hold")()
        await call.write(b"x")
        await asyncio.sleep(0.1)
        call.cancel()
        await asyncio.wait_for(handlers.cancelled.wait(), timeout=10)


async def test_a_stream_message_that_does_not_parse_ends_the_call(stream_server: tuple[int, Streams]) -> None:
    port, _ = stream_server
    server = UnaryServer()
    server.add_method(
        "/test.Streams/Checks",
        Method(external_auth_pb2.CheckRequest.FromString, _read_only_good_messages, _identity, streaming=True),
    )
    checks_port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{checks_port}") as channel:
            call = _stream(channel, "Checks")()
            await call.write(external_auth_pb2.CheckRequest().SerializeToString())  # a good one first
            await call.write(b"\x0a\x05ab")
            assert await asyncio.wait_for(call.code(), timeout=10) is grpc.StatusCode.INVALID_ARGUMENT
            assert (await call.details()).startswith("malformed request: DecodeError")
        # And a message over the size limit, on the other server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_OUT) as channel:
            call = _stream(channel, "Echo")()
            await call.write(b"x" * (3 << 20))
            assert await asyncio.wait_for(call.code(), timeout=10) is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(grace=1)


# -- raw frames -------------------------------------------------------------------------------------------


class RawClient:
    """An HTTP/2 client made of frames, to send what grpcio does not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: dict[S, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(PREFACE + settings_frame(settings or {}))
        return client

    def headers_block(self, path: str, content_type: str = "application/grpc") -> bytes:
        return self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
             ("content-type", content_type), ("te", "trailers")]
        )  # fmt: skip

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout=10)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout=10)
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def until(self, stream_id: int) -> list[tuple[int, int, bytes]]:
        """The frames of `stream_id` (HEADERS decoded to a dict, DATA raw) until its END_STREAM; answers
        the connection's SETTINGS and skips its other frames."""
        got: list[tuple[int, int, bytes]] = []
        while True:
            kind, flags, sid, payload = await self.frame()
            if kind == FrameType.SETTINGS and not flags & 1:
                self.send(frame(FrameType.SETTINGS, 1, 0))
            if sid != stream_id:
                continue
            got.append((kind, flags, payload))
            if kind in (FrameType.HEADERS, FrameType.DATA) and flags & Flag.END_STREAM:
                return got

    def headers_of(self, payload: bytes) -> dict[str, str]:
        return {k: v for k, v in self.decoder.decode(payload)}

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def _message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


async def test_continuation_padding_and_priority_are_read(echo_server: tuple[UnaryServer, int, Echo]) -> None:
    _, port, _ = echo_server
    client = await RawClient.connect(port)
    try:
        block = client.headers_block(ECHO)
        # HEADERS with padding and priority fields, its block split across two CONTINUATION frames.
        first = bytes((3,)) + b"\x00\x00\x00\x00\x10" + block[:5] + b"\x00" * 3
        client.send(frame(FrameType.HEADERS, Flag.PADDED | Flag.PRIORITY, 1, first))
        client.send(frame(FrameType.CONTINUATION, 0, 1, block[5:9]))
        client.send(frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, block[9:]))
        body = _message(b"padded hello")
        client.send(frame(FrameType.DATA, Flag.PADDED, 1, bytes((4,)) + body[:7] + b"\x00" * 4))
        client.send(frame(FrameType.DATA, Flag.END_STREAM, 1, body[7:]))
        frames = await client.until(1)
        kinds = [kind for kind, _, _ in frames]
        assert kinds == [FrameType.HEADERS, FrameType.DATA, FrameType.HEADERS]
        assert client.headers_of(frames[0][2]) == {":status": "200", "content-type": "application/grpc"}
        assert frames[1][2] == _message(b"padded hello")
        assert client.headers_of(frames[2][2]) == {"grpc-status": "0"}
    finally:
        await client.close()


def _path_indexed(path: str) -> bytes:
    """:method POST, :scheme http, then :path added to the peer's table (a literal with incremental indexing)."""
    return b"\x83\x86\x44" + bytes((len(path),)) + path.encode() + GRPC_TYPE


GRPC_TYPE = b"\x0f\x10\x10application/grpc"  # content-type (static entry 31), literal value, not indexed
NEWEST_ENTRY = b"\x83\x86\xbe" + GRPC_TYPE  # :path = the newest entry of the table (index 62)


async def test_a_remembered_header_block_follows_the_changes_of_the_table(
    echo_server: tuple[UnaryServer, int, Echo],
) -> None:
    _, port, _ = echo_server
    client = await RawClient.connect(port)
    try:
        blocks = [
            _path_indexed("/test.Echo/Echo"),  # the table: [Echo]
            NEWEST_ENTRY,  # Echo; the table is unchanged, so the server keeps the parsed block
            _path_indexed("/test.Echo/Abort"),  # the table: [Abort, Echo]
            NEWEST_ENTRY,  # the same bytes as before, which now mean Abort
        ]
        statuses = []
        for number, block in enumerate(blocks):
            stream = 2 * number + 1
            client.send(frame(FrameType.HEADERS, Flag.END_HEADERS, stream, block))
            client.send(frame(FrameType.DATA, Flag.END_STREAM, stream, _message(b"no")))
            frames = await client.until(stream)
            statuses.append(client.headers_of(frames[-1][2])["grpc-status"])
        assert statuses == ["0", "0", "7", "7"]  # Echo, Echo, Abort (PERMISSION_DENIED), Abort
    finally:
        await client.close()


async def test_answers_wait_for_the_peers_flow_control_window(echo_server: tuple[UnaryServer, int, Echo]) -> None:
    _, port, _ = echo_server
    client = await RawClient.connect(port, {S.INITIAL_WINDOW_SIZE: 10})
    try:
        client.send(frame(FrameType.HEADERS, Flag.END_HEADERS, 1, client.headers_block(ECHO)))
        client.send(frame(FrameType.DATA, Flag.END_STREAM, 1, _message(b"0123456789abcdefghij")))
        sent: list[tuple[int, int, bytes]] = []
        while sum(len(p) for k, _, p in sent if k == FrameType.DATA) < 10:
            kind, flags, sid, payload = await client.frame()
            if sid == 1:
                sent.append((kind, flags, payload))
        assert [len(p) for k, _, p in sent if k == FrameType.DATA] == [10]  # the window's worth, no trailers yet
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.reader.readexactly(1), timeout=0.3)
        client.send(window_update(1, 100))
        rest = await client.until(1)
        data = b"".join(p for k, _, p in sent + rest if k == FrameType.DATA)
        assert data == _message(b"0123456789abcdefghij")
        assert client.headers_of(rest[-1][2]) == {"grpc-status": "0"}
    finally:
        await client.close()


async def test_ping_is_answered_and_a_non_grpc_request_gets_415(echo_server: tuple[UnaryServer, int, Echo]) -> None:
    _, port, _ = echo_server
    client = await RawClient.connect(port)
    try:
        client.send(frame(FrameType.PING, 0, 0, b"12345678"))
        while True:
            kind, flags, _, payload = await client.frame()
            if kind == FrameType.PING:
                assert (flags, payload) == (1, b"12345678")
                break
        html = client.headers_block(ECHO, "text/html")
        client.send(frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, 1, html))
        frames = await client.until(1)
        assert client.headers_of(frames[0][2]) == {":status": "415", "content-type": "text/plain"}
    finally:
        await client.close()


async def test_a_connection_that_is_not_http2_is_closed_with_goaway(
    echo_server: tuple[UnaryServer, int, Echo],
) -> None:
    _, port, _ = echo_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    received = await asyncio.wait_for(reader.read(), timeout=10)  # until the server closes
    writer.close()
    goaways = []
    while len(received) >= 9:
        length = int.from_bytes(received[:3], "big")
        if received[3] == FrameType.GOAWAY:
            goaways.append(int.from_bytes(received[13:17], "big"))
        received = received[9 + length :]
    assert goaways == [ErrorCode.PROTOCOL_ERROR]


# -- through Envoy ----------------------------------------------------------------------------------------


async def test_envoy_calls_reach_the_unary_port(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix)
    async with Stack(settings, tmp_path, rate_limit=True, ext_proc=True) as stack:
        assert stack.decision_port not in (0, stack.grpc_port)
        body = {"model": "demo-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            response = await stack.http.post(
                "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": "unary-user@example.com"},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-quota-state"] == "normal"
        async with httpx.AsyncClient() as client:
            clusters = (await client.get(f"http://127.0.0.1:{stack.admin_port}/clusters")).text.splitlines()
        for cluster in (AUTHZ_CLUSTER, RATELIMIT_CLUSTER, EXTPROC_CLUSTER):
            ok = [
                line
                for line in clusters
                if line.startswith(f"{cluster}::127.0.0.1:{stack.decision_port}::rq_success::")
            ]
            assert ok and int(ok[0].rpartition("::")[2]) >= 3, (cluster, [c for c in clusters if c.startswith(cluster)])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.decision_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # The same Check as on the grpc.aio port: a key it does not know is a 401 answer, not an error.
            request = external_auth_pb2.CheckRequest()
            request.attributes.request.http.headers["authorization"] = "Bearer nobody"
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                request, timeout=10, metadata=ENVOY_AUTH
            )
            assert answer.denied_response.status.code == 401
            assert Status(answer.status.code) is Status.UNAUTHENTICATED
