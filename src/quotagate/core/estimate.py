"""Estimating a request's cost before it runs, from the OpenAI-style body.

The estimate is what a reservation holds until the real usage arrives: prompt characters / 4 with a margin,
plus the completion the client allows (`max_tokens`), weighted like the real charge, and never below a floor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from quotagate.core.errors import InvalidRequest
from quotagate.core.model import ModelWeight
from quotagate.core.weights import weighted_cost

# Larger values are certainly mistakes or attacks; refusing them keeps reservations meaningful.
MAX_TOKENS_CEILING = 10_000_000


@dataclass(frozen=True)
class EstimateSettings:
    chars_per_token: float = 4.0
    prompt_margin: float = 1.2
    default_completion_tokens: int = 1024
    minimum: int = 100


@dataclass(frozen=True)
class CompletionRequest:
    """What the estimate needs from a request body."""

    model: str
    prompt_chars: int
    max_tokens: int | None
    stream: bool
    # A streamed answer carries its usage only when the client asks (stream_options.include_usage).
    include_usage: bool = False

    @property
    def needs_usage_asked(self) -> bool:
        return self.stream and not self.include_usage


def parse_body(raw: bytes) -> CompletionRequest | None:
    """The billable part of a request body; None when the body names no model (nothing to bill)."""
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidRequest("'model' must be a non-empty string of at most 256 characters")
    return CompletionRequest(
        model=model,
        prompt_chars=_prompt_chars(body),
        max_tokens=_max_tokens(body),
        stream=body.get("stream") is True,
        include_usage=_include_usage(body),
    )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(body: dict[str, Any]) -> int | None:
    # Newer OpenAI clients send max_completion_tokens instead of max_tokens.
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"'{name}' must be an integer")
        if value < 1 or value > MAX_TOKENS_CEILING:
            raise InvalidRequest(f"'{name}' must be between 1 and {MAX_TOKENS_CEILING}")
        return value
    return None


def _prompt_chars(body: dict[str, Any]) -> int:
    chars = 0
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise InvalidRequest("'messages' must be a list")
        for message in messages:
            if not isinstance(message, dict):
                raise InvalidRequest("each message must be an object")
            chars += _content_chars(message.get("content"))
    for name in ("prompt", "input"):  # completions and embeddings bodies
        if name in body:
            chars += _content_chars(body[name])
    return chars


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    raise InvalidRequest("message content must be a string or a list of parts")


def estimate_cost(request: CompletionRequest, weight: ModelWeight, settings: EstimateSettings) -> int:
    prompt_tokens = math.ceil(round(request.prompt_chars / settings.chars_per_token * settings.prompt_margin, 9))
    completion_tokens = request.max_tokens if request.max_tokens is not None else settings.default_completion_tokens
    return max(settings.minimum, weighted_cost(prompt_tokens, completion_tokens, weight))
