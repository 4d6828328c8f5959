"""The unary server: serves registered grpc.aio servicers over plain HTTP/2 on asyncio.

grpc.aio spends most of a call's CPU bridging gRPC's core and the event loop (a poller thread, callbacks, a
completion queue). What Envoy calls on every request (Check, ShouldRateLimit, ext_proc's stream) comes over a few
long-lived connections, so here it is read straight off the socket instead: the same servicer objects, a fraction
of the cost per call (bench/README.md). Unary methods, and stream methods written reader/writer style (context
read() and write()); everything else (reflection, Admin) stays on the grpc.aio port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import resource
import ssl as _ssl
from collections.abc import Callable
from typing import Any

from quotagate.unary.calls import Method
from quotagate.unary.connection import Connection
from quotagate.unary.frames import ErrorCode, goaway, settings_frame
from quotagate.unary.limits import CauseLog, DecisionLimits, NullObserver, Observer
from quotagate.unary.tls import TlsAccept

log = logging.getLogger("quotagate.unary")
FD_RESERVE = 256  # descriptors left for everything else in the process (stores, the other ports, files)

AddServicer = Callable[[Any, Any], None]


class _Capture:
    """Takes what a generated add_*Servicer_to_server registers, instead of a server."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def registered_handlers(add: AddServicer, servicer: Any) -> tuple[str, dict[str, Any]]:
    """The service name and the method handlers (grpc.RpcMethodHandler) that generated code registers; an
    empty dict for generated code of another shape."""
    capture = _Capture()
    add(servicer, capture)
    return capture.service, capture.handlers


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (free for an unprivileged process); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class _Refused(asyncio.Protocol):
    """A connection past max_connections: accepted (or it would wait in the backlog, holding its descriptor
    in the kernel), told GOAWAY and closed at once."""

    def __init__(self, tls: bool = False) -> None:
        self._tls = tls  # a TLS peer would take a plaintext GOAWAY for a broken handshake: just close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self._tls:
            transport.write(settings_frame({}) + goaway(0, ErrorCode.ENHANCE_YOUR_CALM, "too many connections"))
        transport.close()


class UnaryServer:
    def __init__(
        self,
        max_message_bytes: int | None = None,
        limits: DecisionLimits | None = None,
        observer: Observer | None = None,
    ) -> None:
        limits = limits or DecisionLimits()
        if max_message_bytes is not None:
            limits = dataclasses.replace(limits, max_message_bytes=max_message_bytes)
        self._methods: dict[str, Method] = {}
        self._limits = limits
        self._max_connections = limits.max_connections
        self._observer: Observer = observer or NullObserver()
        self._cause_log: CauseLog | None = None
        self._connections: set[Connection] = set()
        # TLS connections still in their handshake: they hold a descriptor, so they count towards the limit.
        self._handshakes: set[TlsAccept] = set()
        self._ssl: _ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None

    def add_servicer(self, add: AddServicer, servicer: Any) -> None:
        """Registers the methods of `servicer` this server can serve (unary, and streams in reader/writer
        style), as `add(servicer, grpc_server)` would on grpc.aio."""
        service, handlers = registered_handlers(add, servicer)
        if not handlers:
            raise ValueError(f"{add.__name__} registered no method handlers")
        for name, handler in handlers.items():
            path = f"/{service}/{name}"
            parse, serialize = handler.request_deserializer, handler.response_serializer
            if handler.unary_unary is not None:
                self.add_method(path, Method(parse, handler.unary_unary, serialize))
            elif handler.stream_stream is not None and inspect.iscoroutinefunction(handler.stream_stream):
                # Reader/writer style (context.read() and context.write()), as ExternalProcessorService.Process.
                self.add_method(path, Method(parse, handler.stream_stream, serialize, streaming=True))

    def add_method(self, path: str, method: Method) -> None:
        self._methods[path] = method

    async def start(self, host: str, port: int, ssl: _ssl.SSLContext | None = None) -> int:
        """Listens (SO_REUSEPORT, like the grpc.aio port, so `serve --workers N` share it); returns the port.
        With `ssl` (unary.tls.server_context) every connection is TLS, its handshake bounded like a preface."""
        loop = asyncio.get_running_loop()
        # Connections stay below the descriptor limit: past it accept() fails, and every caller waits.
        self._max_connections = max(1, min(self._limits.max_connections, raise_fd_limit() - FD_RESERVE))
        self._cause_log = CauseLog(log, loop.time)
        # The handshake is TlsAccept's (loop.start_tls), which says when it fails; create_server's would not.
        self._ssl = ssl
        self._server = await loop.create_server(self._connect, host, port, reuse_port=True)
        port_taken: int = self._server.sockets[0].getsockname()[1]
        return port_taken

    def _connect(self) -> asyncio.Protocol:
        if len(self._connections) + len(self._handshakes) >= self._max_connections:
            self._observer.limit_hit("max_connections")
            self._observer.closed_for_cause("max_connections")
            if self._cause_log is not None:
                self._cause_log.closed("max_connections", f"over {self._max_connections} connections")
            return _Refused(tls=self._ssl is not None)
        connection = Connection(self._methods, self._limits, self._closed, self._observer, self._cause_log)
        if self._ssl is not None:
            timeout = self._limits.header_read_timeout_seconds  # a handshake is bounded like a preface
            accept = TlsAccept(connection, self._ssl, timeout, self._handshake_over)
            self._handshakes.add(accept)
            return accept
        self._connections.add(connection)
        self._observer.connections(len(self._connections))
        return connection

    def _handshake_over(self, accept: TlsAccept, failure: str | None) -> None:
        self._handshakes.discard(accept)
        if failure is None:
            assert isinstance(accept.connection, Connection)
            self._connections.add(accept.connection)
            self._observer.connections(len(self._connections))
        elif failure:  # a wrong certificate is silent on Envoy's side: say it here
            self._observer.closed_for_cause("tls_handshake")
            if self._cause_log is not None:
                self._cause_log.closed("tls_handshake", failure)

    def _closed(self, connection: Connection) -> None:
        self._connections.discard(connection)
        self._observer.connections(len(self._connections))

    async def stop(self, grace: float) -> None:
        """Stops listening, lets every connection finish the calls it has (GOAWAY), and after `grace` seconds
        closes whatever is left."""
        if self._server is None:
            return
        self._server.close()
        for accept in list(self._handshakes):
            accept.cancel()
        connections = list(self._connections)
        for connection in connections:
            connection.go_away()
        if connections:
            _, left = await asyncio.wait([c.closed for c in connections], timeout=grace)
            for connection in connections:
                if not connection.closed.done():
                    connection.abort()
            if left:
                await asyncio.wait(left, timeout=1)
        await self._server.wait_closed()
        self._server = None
