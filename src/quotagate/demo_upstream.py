"""A fake OpenAI-compatible LLM server for ``quotagate up`` and end-to-end tests.

It answers the APIs LiteLLM serves, each in its own shape (plain JSON or SSE streaming), with deterministic
token usage, so tests can predict exactly what quotagate will charge:

* ``POST /v1/chat/completions`` and ``/v1/completions`` (OpenAI; usage in the last chunk when asked with
  ``stream_options.include_usage``), ``/v1/embeddings`` (usage without completion tokens),
  ``/v1/responses`` (OpenAI Responses; ``input_tokens`` / ``output_tokens``, streamed in
  ``response.completed``) and ``/v1/messages`` (Anthropic; streamed in ``message_start`` and
  ``message_delta``); each also without ``/v1``, and the first three under ``/openai/deployments/{model}/``
  and ``/engines/{model}/`` (the path's model wins over the body's); ``GET /v1/models`` and ``/models``.
* ``prompt_tokens = max(1, ceil(characters of the prompt / 4))`` (message contents, ``prompt``, ``input``,
  ``instructions``, ``system``)
* ``completion_tokens = min(max_tokens or 16, 16)``, or exactly ``N`` when the request carries
  ``x-demo-completion-tokens: N``.  The reply holds one word per completion token.

Other test hooks (request headers):

* ``x-demo-status: 4xx|5xx`` answers that status with an OpenAI-style error body.
* ``x-demo-chunk-delay-ms: N`` sleeps N ms between SSE events of a streamed reply.
* ``x-demo-answer-delay-ms: N`` sleeps N ms before a chat completion that is not streamed is answered (a
  provider writing the whole answer before its headers).

Every request outside ``/_demo/`` is recorded (method, path, lower-cased headers, parsed JSON
body); ``GET /_demo/requests`` returns them oldest first as a JSON list and
``DELETE /_demo/requests`` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

DEFAULT_COMPLETION_TOKENS = 16
MAX_RECORDED_REQUESTS = 200
MODEL_IDS = ("demo-small", "demo-large")

RECORDED_REQUESTS: web.AppKey[deque[dict[str, Any]]] = web.AppKey("recorded_requests", deque)


# (type, code) per status, so clients that branch on OpenAI error types behave realistically.
_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class _RequestError(Exception):
    """Raised inside handlers to answer with an OpenAI-style error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_response(status: int, message: str) -> web.Response:
    if status in _ERROR_KINDS:
        err_type, code = _ERROR_KINDS[status]
    elif status >= 500:
        err_type, code = "server_error", "server_error"
    else:
        err_type, code = "invalid_request_error", f"http_{status}"
    return web.json_response({"error": {"message": message, "type": err_type, "code": code}}, status=status)


def _int_header(request: web.Request, name: str, *, minimum: int) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _RequestError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise _RequestError(400, f"{name} must be >= {minimum}, got {value}")
    return value


def _check_forced_status(request: web.Request) -> None:
    status = _int_header(request, "x-demo-status", minimum=0)
    if status is None:
        return
    if not 400 <= status <= 599:
        raise _RequestError(400, f"x-demo-status must be a 4xx or 5xx status, got {status}")
    raise _RequestError(status, f"demo upstream forced status {status}")


def _content_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        # Only text parts count; images and the like carry no characters here.
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return 0


def _prompt_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _RequestError(400, "each entry of 'messages' must be an object")
        chars += _content_chars(message.get("content"))
    return max(1, (chars + 3) // 4)


def _text_chars(value: object) -> int:
    """Characters of a prompt, input or instructions: a string, a list of strings, or items with content."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return _text_chars(value.get("text")) + _text_chars(value.get("content"))
    return 0


def _body_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    chars = sum(_text_chars(body.get(name)) for name in ("prompt", "input", "instructions", "system"))
    if isinstance(messages, list):
        chars += sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
    return max(1, (chars + 3) // 4)


def _completion_tokens(request: web.Request, body: dict[str, Any]) -> int:
    forced = _int_header(request, "x-demo-completion-tokens", minimum=0)
    if forced is not None:
        return forced
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        # Newer OpenAI clients send this name instead; the Responses API its own.
        max_tokens = body.get("max_completion_tokens", body.get("max_output_tokens"))
    if max_tokens is None:
        return DEFAULT_COMPLETION_TOKENS
    # bool is an int subclass; JSON true is not a token count.
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _RequestError(400, "'max_tokens' must be a positive integer")
    return min(max_tokens, DEFAULT_COMPLETION_TOKENS)


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # covers JSONDecodeError and UnicodeDecodeError
        raise _RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _RequestError(400, "request body must be a JSON object")
    return body


def _words(count: int) -> list[str]:
    # Leading spaces after the first word so streamed deltas concatenate to the plain reply.
    return ["token" if i == 0 else " token" for i in range(count)]


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        _check_forced_status(request)
        body = await _read_json_object(request)
        model = request.match_info.get("model") or body.get("model")  # an Azure-style path names it
        if not isinstance(model, str) or not model:
            raise _RequestError(400, "'model' must be a non-empty string")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "'messages' must be a non-empty list")
        prompt_tokens = _prompt_tokens(messages)
        completion_tokens = _completion_tokens(request, body)
        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        # x-demo-no-usage: behave like a provider that never reports usage (tests of the estimate path).
        no_usage = request.headers.get("x-demo-no-usage") == "1"
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        include_usage = include_usage and not no_usage
        delay_ms = _int_header(request, "x-demo-chunk-delay-ms", minimum=0) or 0
        answer_delay_ms = _int_header(request, "x-demo-answer-delay-ms", minimum=0) or 0
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    words = _words(completion_tokens)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

    if not stream:
        await asyncio.sleep(answer_delay_ms / 1000)
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                **({} if no_usage else {"usage": usage}),
            }
        )

    def chunk(choices: list[dict[str, Any]], chunk_usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            # OpenAI sends "usage": null on every chunk but the last when usage is requested.
            payload["usage"] = chunk_usage
        return f"data: {json.dumps(payload)}\n\n"

    events: list[str] = []
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        events.append(chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if include_usage:
        events.append(chunk([], usage))
    events.append("data: [DONE]\n\n")
    return await _send_stream(request, events, delay_ms)


def _sse(events: list[dict[str, Any]], *, named: bool) -> list[str]:
    """SSE events; `named` ones carry an `event:` line with their type, as the Responses and Anthropic APIs send."""
    return [(f"event: {e['type']}\n" if named else "") + f"data: {json.dumps(e)}\n\n" for e in events]


async def _send_stream(request: web.Request, events: list[str], delay_ms: int) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        for i, event in enumerate(events):
            if i and delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            await response.write(event.encode())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client (or Envoy) hung up mid-stream; tests do this on purpose
    return response


async def _read_other_api(request: web.Request, *, needs_model: bool = True) -> tuple[dict[str, Any], str]:
    """The body and the model of a request to one of the other APIs (the path's model wins, as in LiteLLM)."""
    _check_forced_status(request)
    body = await _read_json_object(request)
    model = request.match_info.get("model") or body.get("model")
    if needs_model and (not isinstance(model, str) or not model):
        raise _RequestError(400, "'model' must be a non-empty string")
    return body, str(model or "")


async def _read_generation(request: web.Request) -> tuple[dict[str, Any], str, int, int, int]:
    """What a request that generates text asks for: body, model, prompt and completion tokens, chunk delay (ms)."""
    body, model = await _read_other_api(request)
    prompt_tokens, completion_tokens = _body_prompt_tokens(body), _completion_tokens(request, body)
    delay_ms = _int_header(request, "x-demo-chunk-delay-ms", minimum=0) or 0
    return body, model, prompt_tokens, completion_tokens, delay_ms


async def _completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's legacy completions: `prompt` in, `choices[].text` out."""
    try:
        body, model, prompt_tokens, completion_tokens, delay_ms = await _read_generation(request)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    words = _words(completion_tokens)
    if body.get("stream") is not True:
        choice = {"index": 0, "text": "".join(words), "finish_reason": "stop"}
        return web.json_response({**base, "choices": [choice], "usage": usage})
    chunks = [{**base, "choices": [{"index": 0, "text": w, "finish_reason": None}]} for w in words]
    chunks.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage})
    return await _send_stream(request, [*_sse(chunks, named=False), "data: [DONE]\n\n"], delay_ms)


async def _embeddings(request: web.Request) -> web.Response:
    """Embeddings report prompt and total tokens only: there is no completion."""
    try:
        body, model = await _read_other_api(request)
        prompt_tokens = _body_prompt_tokens(body)
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    data = [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]} for i in range(count)]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return web.json_response({"object": "list", "model": model, "data": data, "usage": usage})


async def _responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API: usage as input_tokens / output_tokens, streamed in `response.completed`."""
    try:
        body, model, prompt_tokens, completion_tokens, delay_ms = await _read_generation(request)
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)
    words = _words(completion_tokens)
    item_id = f"msg_{uuid.uuid4().hex}"
    message = {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "".join(words), "annotations": []}],
    }
    usage = {
        "input_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    done = {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": [message],
        "usage": usage,
    }
    if body.get("stream") is not True:
        return web.json_response(done)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
    events += [{"type": "response.output_text.delta", "item_id": item_id, "delta": w} for w in words]
    events.append({"type": "response.completed", "response": done})
    return await _send_stream(request, _sse(events, named=True), delay_ms)


async def _messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API: usage as input_tokens / output_tokens; streamed, the input in `message_start`
    and the output so far in `message_delta`."""
    try:
        body, model, prompt_tokens, completion_tokens, delay_ms = await _read_generation(request)
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)
    words = _words(completion_tokens)
    message = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(words)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
    }
    if body.get("stream") is not True:
        return web.json_response(message)
    # message_start states the input (and one output token so far), message_delta the output in the end.
    start_usage = {"input_tokens": prompt_tokens, "output_tokens": 1}
    start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    block = {"type": "text", "text": ""}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": block},
    ]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}} for w in words]
    end_usage = {"output_tokens": completion_tokens}
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": end_usage},
        {"type": "message_stop"},
    ]
    return await _send_stream(request, _sse(events, named=True), delay_ms)


async def _models(request: web.Request) -> web.Response:
    try:
        _check_forced_status(request)
    except _RequestError as exc:
        return _error_response(exc.status, exc.message)
    return web.json_response(
        {"object": "list", "data": [{"id": model_id, "object": "model"} for model_id in MODEL_IDS]}
    )


async def _get_recorded(request: web.Request) -> web.Response:
    recorded = request.app[RECORDED_REQUESTS]
    return web.json_response(list(recorded))


async def _clear_recorded(request: web.Request) -> web.Response:
    recorded = request.app[RECORDED_REQUESTS]
    cleared = len(recorded)
    recorded.clear()
    return web.json_response({"cleared": cleared})


@web.middleware
async def _record_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/_demo/"):
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            # Repeated headers are folded the way HTTP allows, so none is silently lost.
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        raw = await request.read()  # aiohttp caches the body, so the handler can read it again
        body: Any = None
        if raw:
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        request.app[RECORDED_REQUESTS].append(
            {"method": request.method, "path": request.path, "headers": headers, "body": body}
        )
    return await handler(request)


def build_app() -> web.Application:
    """Create the demo upstream application with an empty request log."""
    app = web.Application(middlewares=[_record_requests])
    recorded: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED_REQUESTS)
    app[RECORDED_REQUESTS] = recorded
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", _chat_completions)
        app.router.add_post(f"{prefix}/completions", _completions)
        app.router.add_post(f"{prefix}/embeddings", _embeddings)
        app.router.add_post(f"{prefix}/responses", _responses)
        app.router.add_post(f"{prefix}/messages", _messages)
        app.router.add_get(f"{prefix}/models", _models)
    for prefix in ("/openai/deployments", "/engines"):
        app.router.add_post(prefix + "/{model:.+}/chat/completions", _chat_completions)
        app.router.add_post(prefix + "/{model:.+}/completions", _completions)
        app.router.add_post(prefix + "/{model:.+}/embeddings", _embeddings)
    app.router.add_get("/_demo/requests", _get_recorded)
    app.router.add_delete("/_demo/requests", _clear_recorded)
    return app


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start serving on host:port (0 picks a free port); returns the runner and the bound port.

    Call ``await runner.cleanup()`` to stop it.
    """
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


async def _serve(host: str, port: int) -> None:
    runner, bound_port = await start_demo_upstream(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    # Parents that start us with --port 0 read this line to learn the port.
    print(f"demo upstream listening on http://{shown_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on every platform; there Ctrl-C still ends asyncio.run.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the demo upstream until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m quotagate.demo_upstream",
        description="Fake OpenAI-compatible LLM upstream with deterministic token usage.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default: 0)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
