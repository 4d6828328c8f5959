"""The unary server: serves registered grpc.aio servicers over plain HTTP/2 on asyncio.

grpc.aio spends most of a call's CPU bridging gRPC's core and the event loop (a poller thread, callbacks, a
completion queue). What Envoy calls on every request (Check, ShouldRateLimit, ext_proc's stream) comes over a few
long-lived connections, so here it is read straight off the socket instead: the same servicer objects, a fraction
of the cost per call (bench/README.md). Unary methods, and stream methods written reader/writer style (context
read() and write()); everything else (reflection, Admin) stays on the grpc.aio port.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from quotagate.unary.calls import Method
from quotagate.unary.connection import Connection

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


class UnaryServer:
    def __init__(self, max_message_bytes: int = 8 << 20) -> None:
        self._methods: dict[str, Method] = {}
        self._max_message = max_message_bytes
        self._connections: set[Connection] = set()
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

    async def start(self, host: str, port: int) -> int:
        """Listens (SO_REUSEPORT, like the grpc.aio port, so `serve --workers N` share it); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connect, host, port, reuse_port=True)
        port_taken: int = self._server.sockets[0].getsockname()[1]
        return port_taken

    def _connect(self) -> Connection:
        connection = Connection(self._methods, self._max_message, self._connections.discard)
        self._connections.add(connection)
        return connection

    async def stop(self, grace: float) -> None:
        """Stops listening, lets every connection finish the calls it has (GOAWAY), and after `grace` seconds
        closes whatever is left."""
        if self._server is None:
            return
        self._server.close()
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
