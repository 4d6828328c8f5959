"""The pure usage readers behind ext_proc: JSON bodies, SSE streams cut anywhere, usage asked for and hidden."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quotagate.core.usage_capture import (
    SseUsageReader,
    Usage,
    ask_for_stream_usage,
    estimate_tokens,
    usage_from_json,
)


def event(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


def chunk(content: str, usage: Any = "absent") -> dict[str, Any]:
    data: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    if usage != "absent":
        data["usage"] = usage
    return data


USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
STREAM = (
    event(chunk("Olá", None))
    + event(chunk(" mundo", None))
    + event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    + event("[DONE]")
)


def test_usage_from_a_json_answer() -> None:
    assert usage_from_json(json.dumps({"usage": USAGE}).encode()) == Usage(11, 4)
    assert usage_from_json(b'{"choices": []}') is None
    assert usage_from_json(b'{"usage": {"prompt_tokens": -1, "completion_tokens": 2}}') is None
    assert usage_from_json(b"not json") is None
    assert usage_from_json(b"[1, 2]") is None


def test_usage_is_asked_for_only_when_a_stream_lacks_it() -> None:
    changed = ask_for_stream_usage(b'{"model": "m", "stream": true, "stream_options": {"x": 1}}')
    assert changed is not None
    assert json.loads(changed)["stream_options"] == {"x": 1, "include_usage": True}
    assert ask_for_stream_usage(b'{"model": "m", "stream": false}') is None
    assert ask_for_stream_usage(b'{"stream": true, "stream_options": {"include_usage": true}}') is None
    assert ask_for_stream_usage(b"{broken") is None


@pytest.mark.parametrize("size", [1, 2, 7, 50, len(STREAM)])
def test_a_stream_cut_anywhere_gives_the_same_usage_and_content(size: int) -> None:
    reader = SseUsageReader(hide_usage=False)
    passed = b"".join(reader.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size)) + reader.finish()
    assert passed == STREAM  # nothing is changed when the client asked for the usage itself
    assert reader.usage == Usage(11, 4)
    assert reader.content_chars == len("Olá mundo")


@pytest.mark.parametrize("size", [1, 3, 64, len(STREAM)])
def test_hidden_usage_leaves_a_stream_the_client_can_read(size: int) -> None:
    reader = SseUsageReader(hide_usage=True)
    passed = b"".join(reader.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size)) + reader.finish()
    assert reader.usage == Usage(11, 4)
    blocks = [b for b in passed.split(b"\n\n") if b]
    assert blocks[-1] == b"data: [DONE]"
    events = [json.loads(b[len(b"data: ") :]) for b in blocks[:-1]]
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["Olá", " mundo"]
    assert all("usage" not in e for e in events)


def test_usage_carried_by_a_content_chunk_is_removed_from_it_but_the_content_stays() -> None:
    reader = SseUsageReader(hide_usage=True)
    passed = reader.feed(event(chunk("fim", USAGE)) + event("[DONE]"))
    first = json.loads(passed.split(b"\n\n")[0][len(b"data: ") :])
    assert first["choices"][0]["delta"]["content"] == "fim" and "usage" not in first
    assert reader.usage == Usage(11, 4)


def test_a_stream_without_usage_counts_what_was_streamed() -> None:
    reader = SseUsageReader(hide_usage=False)
    reader.feed(event(chunk("a" * 30)) + event(chunk("b" * 10)))
    reader.finish()
    assert reader.usage is None
    assert reader.content_chars == 40
    assert estimate_tokens(reader.content_chars, 4.0) == 10
    assert estimate_tokens(0, 4.0) == 0
    assert estimate_tokens(1, 4.0) == 1
