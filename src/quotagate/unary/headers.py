"""HPACK decoding that remembers header blocks by their bytes.

A gRPC peer sends the same header block for every call of a method once its table is filled: Envoy's
:path, for one, is a Huffman-coded literal that is never indexed, and decoding it in Python cost ~9% of a busy
quotagate's CPU. A block means the same thing for as long as the table it refers to is unchanged, so a block
that leaves the table as it was is remembered (parsed) by its bytes until a block changes the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import hpack

T = TypeVar("T")
Headers = Sequence[tuple[bytes, bytes]]

MAX_CACHED_BLOCKS = 256


class BlockDecoder(Generic[T]):
    """Decodes one connection's header blocks in order, and hands back `parse` of each (parsed once per block
    while the table stays the same). Raises hpack.HPACKError for a block that does not decode."""

    def __init__(self, parse: Callable[[Headers], T], max_header_list_size: int = 1 << 16) -> None:
        self._parse = parse
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._known: dict[bytes, T] = {}

    def decode(self, block: bytes) -> T:
        known = self._known.get(block)
        if known is not None:
            return known
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (len(entries), table.maxsize, entries[0] if entries else None)
        # Decoded in every case: the table must follow everything the peer encoded.
        parsed = self._parse(self._decoder.decode(block, raw=True))  # type: ignore[arg-type]
        after = (len(entries), table.maxsize, entries[0] if entries else None)
        if after[:2] != before[:2] or after[2] is not before[2]:
            self._known.clear()  # an insertion or a resize: a remembered block may mean something else now
        elif len(self._known) < MAX_CACHED_BLOCKS:
            self._known[block] = parsed
        return parsed
