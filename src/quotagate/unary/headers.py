"""HPACK decoding that remembers header blocks by their bytes.

A gRPC peer sends the same header block for every call of a method once its table is filled: Envoy's
:path, for one, is a Huffman-coded literal that is never indexed, and decoding it in Python cost ~9% of a busy
quotagate's CPU. A block means the same thing for as long as the table it refers to is unchanged, so a block
that leaves the table as it was is remembered (parsed) by its bytes until a block changes the table. What is
remembered is bounded in bytes (blocks and what they decode to), not in entries, and a block that is mostly
table-size updates or otherwise decodes to little is refused before it costs more (a "header bomb").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import hpack

T = TypeVar("T")
Headers = Sequence[tuple[bytes, bytes]]

MAX_CACHED_BYTES = 64 << 10  # per connection: blocks remembered plus what they decoded to
MAX_CACHED_BLOCK = 4096  # a larger block is decoded each time, never remembered
_FIELD_OVERHEAD = 32  # RFC 7541 4.1: a field's size is its name and value plus 32


class HeaderBomb(Exception):
    """A block that costs far more to decode than it yields (the connection ends with ENHANCE_YOUR_CALM)."""


def table_size_updates(block: bytes) -> int:
    """How many dynamic table size updates open the block (RFC 7541 6.3; hpack refuses one after a field)."""
    count, pos, size = 0, 0, len(block)
    while pos < size and block[pos] & 0xE0 == 0x20:
        count += 1
        if block[pos] & 0x1F == 0x1F:  # a multi-byte integer: continuation bytes have the high bit set
            pos += 1
            while pos < size and block[pos] & 0x80:
                pos += 1
        pos += 1
    return count


class BlockDecoder(Generic[T]):
    """Decodes one connection's header blocks in order, and hands back `parse` of each (parsed once per block
    while the table stays the same). Raises hpack.HPACKError for a block that does not decode, HeaderBomb for
    one with more than `max_table_size_updates` size updates or `bomb_ratio` times larger than its fields."""

    def __init__(
        self,
        parse: Callable[[Headers], T],
        max_header_list_size: int = 1 << 16,
        max_table_size_updates: int = 2,
        bomb_ratio: int = 2,
        bomb_floor: int = 1024,
    ) -> None:
        self._parse = parse
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._max_updates, self._bomb_ratio, self._bomb_floor = max_table_size_updates, bomb_ratio, bomb_floor
        self._known: dict[bytes, T] = {}
        self._known_bytes = 0

    def decode(self, block: bytes) -> T:
        known = self._known.get(block)
        if known is not None:
            return known
        if block and block[0] & 0xE0 == 0x20 and table_size_updates(block) > self._max_updates:
            raise HeaderBomb(f"more than {self._max_updates} table size updates in a header block")
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (len(entries), table.maxsize, entries[0] if entries else None)
        # Decoded in every case: the table must follow everything the peer encoded.
        fields = self._decoder.decode(block, raw=True)
        parsed = self._parse(fields)  # type: ignore[arg-type]
        after = (len(entries), table.maxsize, entries[0] if entries else None)
        size, decoded = len(block), 0
        if size > self._bomb_floor or size <= MAX_CACHED_BLOCK:
            decoded = sum(len(name) + len(value) + _FIELD_OVERHEAD for name, value in fields)
            if size > self._bomb_floor and size > self._bomb_ratio * decoded:
                raise HeaderBomb(f"a header block of {size} bytes decodes to {decoded}")
        if after[:2] != before[:2] or after[2] is not before[2]:
            self._known.clear()  # an insertion or a resize: a remembered block may mean something else now
            self._known_bytes = 0
        elif size <= MAX_CACHED_BLOCK:
            if self._known_bytes + size + decoded > MAX_CACHED_BYTES:
                self._known.clear()  # full: start over, so the blocks in use now get remembered
                self._known_bytes = 0
            self._known[block] = parsed
            self._known_bytes += size + decoded
        return parsed
