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


# -- the other APIs: embeddings, legacy completions, Responses, Anthropic Messages --------------------------


def named(data: dict[str, Any]) -> bytes:
    """An SSE event with an `event:` line, as the Responses and Anthropic APIs send them."""
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def read_stream(stream: bytes, size: int) -> SseUsageReader:
    reader = SseUsageReader(hide_usage=False)
    passed = b"".join(reader.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + reader.finish()
    assert passed == stream  # a stream quotagate only reads reaches the client unchanged
    return reader


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "total_tokens": 10}, Usage(10, 0)),  # embeddings (OpenAI)
        ({"prompt_tokens": 10, "completion_tokens": None, "total_tokens": 10}, Usage(10, 0)),
        ({"completion_tokens": 0, "prompt_tokens": 10, "total_tokens": 0}, Usage(10, 0)),  # LiteLLM's embeddings
        ({"input_tokens": 36, "output_tokens": 87, "total_tokens": 123}, Usage(36, 87)),  # Responses
        ({"input_tokens": 2095, "output_tokens": 503}, Usage(2095, 503)),  # Anthropic
        (
            {"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 7},
            Usage(125, 7),
        ),
    ],
)
def test_usage_from_every_apis_json_answer(usage: dict[str, Any], expected: Usage) -> None:
    assert usage_from_json(json.dumps({"usage": usage}).encode()) == expected


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "10"},
        {"prompt_tokens": 10, "completion_tokens": "x"},
        {"prompt_tokens": -1, "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"input_tokens": 3},
        {"output_tokens": 3},
        {"input_tokens": None, "output_tokens": 3},
        {},
        [],
    ],
)
def test_a_usage_missing_or_invalid_counts_is_no_usage(usage: Any) -> None:
    assert usage_from_json(json.dumps({"usage": usage}).encode()) is None


RESPONSES_STREAM = (
    named({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "usage": None}})
    + named({"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Olá"})
    + named({"type": "response.output_text.delta", "item_id": "msg_1", "delta": " mundo"})
    + named(
        {
            "type": "response.completed",
            "response": {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 36, "output_tokens": 87}},
        }
    )
)

ANTHROPIC_STREAM = (
    named({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 2095, "output_tokens": 1}}})
    + named({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    + named({"type": "ping"})
    + named({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Olá"}})
    + named({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " mundo"}})
    + named({"type": "content_block_stop", "index": 0})
    + named({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 250}})
    + named({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 503}})  # a running total
    + named({"type": "message_stop"})
)

COMPLETIONS_STREAM = (
    event({"object": "text_completion", "choices": [{"index": 0, "text": "Olá"}]})
    + event({"object": "text_completion", "choices": [{"index": 0, "text": " mundo", "finish_reason": "stop"}]})
    + event({"object": "text_completion", "choices": [], "usage": USAGE})
    + event("[DONE]")
)


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
@pytest.mark.parametrize(
    ("stream", "expected"),
    [(RESPONSES_STREAM, Usage(36, 87)), (ANTHROPIC_STREAM, Usage(2095, 503)), (COMPLETIONS_STREAM, Usage(11, 4))],
    ids=["responses", "anthropic", "completions"],
)
def test_every_apis_stream_cut_anywhere_gives_its_usage_and_content(stream: bytes, expected: Usage, size: int) -> None:
    reader = read_stream(stream, size)
    assert reader.usage == expected
    assert reader.content_chars == len("Olá mundo")


def test_an_anthropic_stream_cut_before_its_last_delta_has_the_output_so_far() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")]
    assert read_stream(cut, 64).usage == Usage(2095, 1)


def test_a_responses_stream_that_never_completes_has_no_usage() -> None:
    cut = RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed")]
    reader = read_stream(cut, 64)
    assert reader.usage is None
    assert reader.content_chars == len("Olá mundo")  # what the estimate falls back on


def test_a_completions_stream_asked_for_its_usage_hides_it_from_the_client() -> None:
    reader = SseUsageReader(hide_usage=True)
    passed = reader.feed(COMPLETIONS_STREAM) + reader.finish()
    assert reader.usage == Usage(11, 4)
    assert b"usage" not in passed and b"[DONE]" in passed
