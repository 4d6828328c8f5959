"""Reading what a completion cost from the bytes that pass through Envoy.

Pure functions and a small incremental parser: the ext_proc adapter feeds them request and response bodies;
nothing here knows about Envoy or gRPC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return Usage(prompt, completion)


def usage_from_json(body: bytes) -> Usage | None:
    """The `usage` of a complete JSON completion, if it has a valid one."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return _usage(data.get("usage")) if isinstance(data, dict) else None


def ask_for_stream_usage(body: bytes) -> bytes | None:
    """A streamed request's body with `stream_options.include_usage` turned on, or None when nothing needs
    to change (not streamed, already asked for, or not a JSON object)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("stream") is not True:
        return None
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def estimate_tokens(chars: int, chars_per_token: float) -> int:
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


class SseUsageReader:
    """Follows an OpenAI-style SSE stream chunk by chunk: counts the content streamed and finds the usage.

    With `hide_usage` (quotagate asked for the usage itself, the client did not), the usage is taken out of
    what the client receives: an event that only carried usage is dropped, and `usage` is removed from an
    event that also carried choices. Events are passed on whole, so a partial event waits for its end.
    """

    def __init__(self, hide_usage: bool) -> None:
        self.hide_usage = hide_usage
        self.usage: Usage | None = None
        self.content_chars = 0
        self.events = 0
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to pass on for this chunk (the chunk itself unless usage is hidden)."""
        data = self._partial + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._partial = data
            return b"" if self.hide_usage else chunk
        complete, self._partial = data[: cut + 2], data[cut + 2 :]
        out = [self._event(raw) for raw in complete.split(b"\n\n")[:-1]]
        if not self.hide_usage:
            return chunk
        return b"".join(e for e in out if e)

    def finish(self) -> bytes:
        """Whatever was held back at the end of the stream (an unterminated last event)."""
        rest, self._partial = self._partial, b""
        if rest.strip():
            kept = self._event(rest)
            return kept if self.hide_usage else b""
        return rest if self.hide_usage else b""

    def _event(self, raw: bytes) -> bytes:
        """Reads one event; returns it as it should reach the client (b"" to drop it)."""
        whole = raw + b"\n\n"
        payload = b"".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")).strip()
        if not payload or payload == b"[DONE]":
            return whole
        try:
            event = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return whole
        if not isinstance(event, dict):
            return whole
        self.events += 1
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.content_chars += len(delta["content"])
        usage = _usage(event.get("usage"))
        if usage is None:
            if self.hide_usage and "usage" in event and event["usage"] is None:
                del event["usage"]  # the client did not ask for the usage field at all
                return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
            return whole
        self.usage = usage
        if not self.hide_usage:
            return whole
        if not choices:
            return b""
        del event["usage"]
        return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
