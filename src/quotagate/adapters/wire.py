"""Registers servicers so that a request that does not parse is answered INVALID_ARGUMENT.

grpcio answers a request its deserializer rejects (invalid UTF-8 in a string field, a truncated message) with
UNKNOWN or INTERNAL, which reads as a server fault. Here each method's deserializer hands back a marker instead
of raising, and the method aborts cleanly on that marker before the servicer sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from quotagate.unary.server import AddServicer, registered_handlers


class Malformed:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_or_mark(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:  # whatever the protobuf runtime raises for bytes it cannot read
            return Malformed(f"{type(exc).__name__}: {exc}"[:200])

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")


async def read_checked(context: grpc.aio.ServicerContext) -> Any:
    """The next message of a request stream, or None at its end; INVALID_ARGUMENT for one that did not parse.

    Reading with context.read() rather than iterating the request iterator matters when a handler stops
    before the client does: an iterator left suspended is closed later by asyncio, and while that close hangs
    it holds the whole call, native memory included (a leak seen under a soak with Envoy cancelling ext_proc
    streams once they are answered)."""
    message = await context.read()
    if message is grpc.aio.EOF:
        return None
    if isinstance(message, Malformed):
        await _refuse(context, message)
    return message


async def _checked_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await _refuse(context, request)
        yield request


def _guard(handler: Any) -> Any:
    deserializer = _parse_or_mark(handler.request_deserializer)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, handler.response_serializer)
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        produce = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            async for response in produce(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, handler.response_serializer)
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        converse = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in converse(_checked_stream(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, handler.response_serializer)
    if handler.stream_stream is not None and inspect.iscoroutinefunction(handler.stream_stream):
        # Reader/writer style: the handler reads with read_checked, which refuses the marker itself.
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, deserializer, handler.response_serializer)
    return handler  # a shape this module does not wrap keeps grpcio's own handling


def add_guarded(server: grpc.aio.Server, add: AddServicer, servicer: Any) -> None:
    """`add(servicer, server)`, with every method answering unparsable requests with INVALID_ARGUMENT."""
    service, registered = registered_handlers(add, servicer)
    if not registered:
        add(servicer, server)  # generated code of another shape: registered as it is
        return
    handlers = {name: _guard(handler) for name, handler in registered.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
