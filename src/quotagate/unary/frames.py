"""HTTP/2 wire pieces (RFC 9113) and the fixed HPACK blocks of gRPC answers (RFC 7541).

Only what a server of unary gRPC calls needs: frame headers, SETTINGS, the literal header encoding used for
answers (never indexed, so the peer's decoder table is never touched), and the gRPC status codes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from urllib.parse import quote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE = 9
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(IntEnum):
    END_STREAM = 0x1  # DATA, HEADERS; ACK on SETTINGS and PING has the same bit
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


ACK = 0x1


class Setting(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Status(IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY and this code."""

    def __init__(self, code: ErrorCode, reason: str, cause: str = "") -> None:
        super().__init__(reason)
        # `cause` names a flood or limit (metrics' `cause` label); a plain protocol error goes by its code.
        self.code, self.cause = code, cause or code.name.lower()


def frame(kind: FrameType, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def settings_frame(values: dict[Setting, int]) -> bytes:
    return frame(FrameType.SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(FrameType.RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: ErrorCode, reason: str = "") -> bytes:
    return frame(FrameType.GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + reason.encode()[:256])


def complete_frames(buf: bytearray, max_size: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each complete frame at the start of `buf`, which loses them as they
    are read; a frame over `max_size` bytes is a FRAME_SIZE_ERROR."""
    pos, size = 0, len(buf)
    try:
        while size - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > max_size:
                raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > size:
                break
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            kind, flags, payload = buf[pos + 3], buf[pos + 4], bytes(buf[pos + 9 : end])
            pos = end
            yield kind, flags, stream_id, payload
    finally:
        del buf[:pos]


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
    return [struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6)]


def strip_padding(flags: int, payload: bytes, priority: bool = False) -> bytes:
    """The frame's content without its padding (and, for HEADERS, without the priority fields)."""
    start, end = 0, len(payload)
    if flags & Flag.PADDED:
        if not payload:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "padded frame without a pad length")
        start, end = 1, end - payload[0]
    if priority and flags & Flag.PRIORITY:
        start += 5
    if end < start:
        raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[start:end]


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries `first` above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field 'literal without indexing, new name', strings not Huffman-coded (RFC 7541 6.2.2)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


# :status 200 is entry 8 of the static table; content-type is entry 31, referenced by index with a literal value.
RESPONSE_HEADERS = b"\x88" + _integer(31, 4, 0) + _integer(16, 7, 0) + b"application/grpc"
_OK_TRAILERS = literal(b"grpc-status", b"0")


def trailers(status: Status, message: str = "") -> bytes:
    if status == Status.OK and not message:
        return _OK_TRAILERS
    block = literal(b"grpc-status", str(int(status)).encode())
    if message:
        # grpc-message is percent-encoded (gRPC over HTTP/2, "Responses"); spaces may stay as they are.
        block += literal(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block
