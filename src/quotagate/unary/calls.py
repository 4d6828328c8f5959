"""What a handler sees of a call: the method it implements, its context, and how it ends with a status.

The contexts offer the part of grpc.aio.ServicerContext that quotagate's handlers use, so the same servicer
objects run on grpc.aio and here: `abort` and `invocation_metadata` for every call, `read` and `write` for
streams (reader/writer style, as ExternalProcessorService.Process uses them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from grpc.aio import EOF

from quotagate.unary.frames import Status

Metadata = tuple[tuple[bytes, bytes], ...]


class Abort(Exception):
    """Raised by Context.abort: the call ends with this status and message."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(details)
        self.status, self.details = status, details


@dataclass(frozen=True, slots=True)
class Method:
    """A method: request parser, handler, response serializer. A unary handler is (request, context) ->
    response; a streaming one (requests, context) -> None, reading and writing through the context."""

    deserialize: Callable[[bytes], Any]
    handle: Callable[[Any, Any], Awaitable[Any]]
    serialize: Callable[[Any], bytes]
    streaming: bool = False


class Context:
    __slots__ = ("_metadata",)

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    async def abort(self, code: Any, details: str = "", trailing_metadata: object = ()) -> None:
        # grpc.StatusCode's value is (number, name); a Status is taken as it is.
        number = code.value[0] if isinstance(code.value, tuple) else int(code)
        raise Abort(Status(number), details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._metadata)


class StreamIO(Protocol):
    """The connection's side of one stream."""

    async def read(self) -> Any: ...

    async def write(self, payload: bytes) -> None: ...


class StreamContext(Context):
    __slots__ = ("_io", "_serialize")

    def __init__(self, metadata: Metadata, io: StreamIO, serialize: Callable[[Any], bytes]) -> None:
        super().__init__(metadata)
        self._io, self._serialize = io, serialize

    async def read(self) -> Any:
        """The next request message, or grpc.aio.EOF once the client has sent its last."""
        return await self._io.read()

    async def write(self, message: Any) -> None:
        """Sends a response message; waits while the peer's flow-control window holds earlier ones back."""
        await self._io.write(self._serialize(message))

    async def messages(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not EOF:
            yield message
