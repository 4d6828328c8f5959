"""Reading what a completion cost from the bytes that pass through Envoy.

Pure functions and a small incremental parser: the ext_proc adapter feeds them request and response bodies;
nothing here knows about Envoy or gRPC.

Where each API reports its usage (every shape is recognised by its fields, so one reader serves every route):

- OpenAI chat and legacy completions: `usage.prompt_tokens` / `completion_tokens`; streamed, in the last
  chunk's `usage` (only when asked with `stream_options.include_usage`).
- embeddings: `usage.prompt_tokens` (and `total_tokens`), no completion tokens: those count 0.
- OpenAI Responses: `usage.input_tokens` / `output_tokens`; streamed, in `response.usage` of the
  `response.completed` (or `.incomplete` / `.failed`) event.
- Anthropic Messages: `usage.input_tokens` (+ `cache_creation_input_tokens`, `cache_read_input_tokens`, which
  Anthropic counts apart) / `output_tokens`; streamed, the input in `message_start`'s `message.usage`, the output
  in each `message_delta`'s `usage` (a running total: the last one counts).
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


def _count(value: Any) -> int | None:
    # bool is an int subclass, and JSON true is no token count
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


_ANTHROPIC_CACHE_INPUT = ("cache_creation_input_tokens", "cache_read_input_tokens")


def _counts(value: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens an usage object states, each None when it does not state it."""
    if not isinstance(value, dict):
        return None, None
    if "prompt_tokens" in value:  # OpenAI chat, completions, embeddings
        prompt = _count(value.get("prompt_tokens"))
        completion = value.get("completion_tokens")
        # Embeddings have no completion: absent (or LiteLLM's null) counts 0; anything else must be a count.
        return prompt, 0 if completion is None else _count(completion)
    prompt = _count(value.get("input_tokens"))  # Responses, Anthropic Messages
    if prompt is not None:
        prompt += sum(_count(value.get(name)) or 0 for name in _ANTHROPIC_CACHE_INPUT)
    return prompt, _count(value.get("output_tokens"))


def _usage(value: Any) -> Usage | None:
    """A complete usage: both counts stated and valid."""
    prompt, completion = _counts(value)
    if prompt is None or completion is None:
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


# A completion that ends by calling tools is left alone: text next to a tool call could break the client.
_TOOL_FINISH = ("tool_calls", "function_call")


def append_to_json_content(body: bytes, text: str) -> bytes | None:
    """A JSON completion with `text` added to its first choice's message content, or None when it has no
    plain text answer to add to (not a completion, tool calls, refused content)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    first = choices[0]
    message = first.get("message")
    if first.get("finish_reason") in _TOOL_FINISH or not isinstance(message, dict):
        return None
    if message.get("tool_calls") or not isinstance(message.get("content"), str):
        return None
    message["content"] += text
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


class SseUsageReader:
    """Follows an SSE stream chunk by chunk (OpenAI chat or completions, Responses, Anthropic Messages): counts
    the content streamed and finds the usage.

    With `hide_usage` (quotagate asked for the usage itself, the client did not), the usage is taken out of
    what the client receives: an event that only carried usage is dropped, and `usage` is removed from an
    event that also carried choices. With `hold_done`, `data: [DONE]` and whatever follows it are held back
    (see `release`), so one more chunk can go before it. While either rewrites the stream, events are passed
    on whole, so a partial event waits for its end.
    """

    def __init__(self, hide_usage: bool, hold_done: bool = False) -> None:
        self.hide_usage = hide_usage
        self.hold_done = hold_done
        self.usage: Usage | None = None
        self.content_chars = 0
        self.events = 0
        self.done_seen = False
        # What a chunk of our own must repeat to belong to this stream.
        self.completion_id = ""
        self.model = ""
        self.created = 0
        self.finish_reason = ""
        self._held = b""
        self._partial = b""

    @property
    def rewrites(self) -> bool:
        return self.hide_usage or self.hold_done

    @property
    def ended_with_tools(self) -> bool:
        return self.finish_reason in _TOOL_FINISH

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to pass on for this chunk (the chunk itself unless the stream is rewritten)."""
        data = self._partial + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._partial = data
            return b"" if self.rewrites else chunk
        complete, self._partial = data[: cut + 2], data[cut + 2 :]
        out = [self._event(raw) for raw in complete.split(b"\n\n")[:-1]]
        if not self.rewrites:
            return chunk
        return b"".join(e for e in out if e)

    def finish(self) -> bytes:
        """Whatever was held back at the end of the stream (an unterminated last event)."""
        rest, self._partial = self._partial, b""
        if rest.strip():
            kept = self._event(rest)
            return kept if self.rewrites else b""
        return rest if self.rewrites else b""

    def release(self) -> bytes:
        """The `[DONE]` event and what followed it, held back under `hold_done`."""
        held, self._held = self._held, b""
        return held

    def chunk_event(self, content: str) -> bytes:
        """One more `chat.completion.chunk` of this stream (same id and model) carrying `content`."""
        event = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
        return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

    def _event(self, raw: bytes) -> bytes:
        """Reads one event; returns it as it should reach the client (b"" to drop or hold it)."""
        whole = raw + b"\n\n"
        if self.done_seen and self.hold_done:
            self._held += whole
            return b""
        payload = b"".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")).strip()
        if payload == b"[DONE]":
            self.done_seen = True
            if self.hold_done:
                self._held += whole
                return b""
            return whole
        if not payload:
            return whole
        try:
            event = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return whole
        if not isinstance(event, dict):
            return whole
        self.events += 1
        self._remember_stream(event)
        self._other_apis(event)
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.content_chars += len(delta["content"])
                if isinstance(choice.get("text"), str):  # legacy completions
                    self.content_chars += len(choice["text"])
                if choice.get("index", 0) == 0 and isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
        if event.get("type") == "message_delta":  # Anthropic: the output so far, not a whole usage
            self._merge(event.get("usage"))
            return whole
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

    def _other_apis(self, event: dict[str, Any]) -> None:
        """The usage and text of the events that are not OpenAI chunks: Anthropic's and the Responses API's."""
        kind = event.get("type")
        if not isinstance(kind, str):
            return
        delta = event.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
            self.content_chars += len(delta["text"])
        elif kind == "response.output_text.delta" and isinstance(delta, str):
            self.content_chars += len(delta)
        elif kind == "message_start" and isinstance(event.get("message"), dict):
            self._merge(event["message"].get("usage"))
        elif kind.startswith("response.") and isinstance(event.get("response"), dict):
            usage = _usage(event["response"].get("usage"))  # null until the response is done
            if usage is not None:
                self.usage = usage

    def _merge(self, value: Any) -> None:
        """Takes the counts an Anthropic event states, keeping the others: message_start states the input,
        each message_delta the output so far."""
        prompt, completion = _counts(value)
        if prompt is None and completion is None:
            return
        known = self.usage or Usage(0, 0)
        self.usage = Usage(
            known.prompt_tokens if prompt is None else prompt,
            known.completion_tokens if completion is None else completion,
        )

    def _remember_stream(self, event: dict[str, Any]) -> None:
        if not self.completion_id and isinstance(event.get("id"), str):
            self.completion_id = event["id"]
        if not self.model and isinstance(event.get("model"), str):
            self.model = event["model"]
        if not self.created and isinstance(event.get("created"), int):
            self.created = event["created"]
