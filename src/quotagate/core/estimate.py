"""Estimating a request's cost before it runs, from its path and body.

The path says which API the request speaks (ApiKind: OpenAI's chat completions, legacy completions,
embeddings and Responses, Anthropic's Messages) and, on Azure-style routes, the model. The estimate is what a
reservation holds until the real usage arrives: prompt characters / 4 with a margin, plus the completion the
client allows (`max_tokens` and its aliases), weighted like the real charge, and never below a floor
(`EstimateSettings.minimum`): a body quotagate cannot read is still never free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

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


class ApiKind(StrEnum):
    """Which API a request speaks, from its path: it says where the answer reports its usage."""

    CHAT = "chat"  # OpenAI chat completions
    COMPLETIONS = "completions"  # OpenAI legacy completions
    EMBEDDINGS = "embeddings"  # usage without completion tokens
    RESPONSES = "responses"  # OpenAI Responses: input_tokens / output_tokens
    MESSAGES = "messages"  # Anthropic Messages: input_tokens / output_tokens
    MODELS = "models"  # listing models: free, but still behind Check
    OTHER = "other"  # a path quotagate does not know (Envoy refuses these itself): metered at the floor


# The streams that report their usage only when asked (stream_options.include_usage); the others always do.
ASKS_FOR_USAGE = frozenset({ApiKind.CHAT, ApiKind.COMPLETIONS})

_PLAIN_PATHS: dict[str, ApiKind] = {
    f"{prefix}/{name}": kind
    for prefix in ("", "/v1")
    for name, kind in (
        ("chat/completions", ApiKind.CHAT),
        ("completions", ApiKind.COMPLETIONS),
        ("embeddings", ApiKind.EMBEDDINGS),
        ("responses", ApiKind.RESPONSES),
        ("messages", ApiKind.MESSAGES),
        ("models", ApiKind.MODELS),
    )
}
# Azure-style routes name the model in the path; as LiteLLM's `{model:path}`, the model may hold "/", and the
# chat route is tried first (".../x/chat/completions" is model x's chat, not model "x/chat"'s completions).
_MODEL_PATH_PREFIXES = ("/openai/deployments/", "/engines/")
_MODEL_PATH_SUFFIXES = (
    ("/chat/completions", ApiKind.CHAT),
    ("/completions", ApiKind.COMPLETIONS),
    ("/embeddings", ApiKind.EMBEDDINGS),
)


def api_of(path: str) -> tuple[ApiKind, str]:
    """The API a request path speaks and the model the path names ("" when it names none)."""
    path = path.partition("?")[0]
    kind = _PLAIN_PATHS.get(path)
    if kind is not None:
        return kind, ""
    for prefix in _MODEL_PATH_PREFIXES:
        if path.startswith(prefix):
            for suffix, kind in _MODEL_PATH_SUFFIXES:
                model = path[len(prefix) : -len(suffix)]
                if path.endswith(suffix) and model and len(prefix) + len(model) + len(suffix) == len(path):
                    return kind, unquote(model)
    return ApiKind.OTHER, ""


@dataclass(frozen=True)
class CompletionRequest:
    """What the estimate needs from a request."""

    model: str  # "" when neither the path nor the body names one
    prompt_chars: int
    max_tokens: int | None
    stream: bool
    # A streamed answer carries its usage only when the client asks (stream_options.include_usage).
    include_usage: bool = False
    api: ApiKind = ApiKind.CHAT

    @property
    def needs_usage_asked(self) -> bool:
        return self.stream and not self.include_usage and self.api in ASKS_FOR_USAGE


def parse_body(raw: bytes, path: str = "") -> CompletionRequest | None:
    """The billable part of a request from its body and path; None only for what is free (listing models).

    A body that names no model (Azure-style paths name it in the path, which wins as it does in LiteLLM), or an
    empty body, is still billable: it is estimated at the floor."""
    api, path_model = api_of(path)
    if api is ApiKind.MODELS:
        return None
    body = _json_object(raw)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise InvalidRequest("'model' must be a non-empty string of at most 256 characters")
    if path_model:
        if len(path_model) > 256:
            raise InvalidRequest("the model in the path must be at most 256 characters")
        model = path_model
    return CompletionRequest(
        model=model or "",
        prompt_chars=_prompt_chars(body),
        max_tokens=_max_tokens(body),
        stream=body.get("stream") is True,
        include_usage=_include_usage(body),
        api=api,
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(body: dict[str, Any]) -> int | None:
    # Newer OpenAI clients send max_completion_tokens instead of max_tokens; Responses max_output_tokens.
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
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
    # completions (prompt), embeddings and Responses (input), Responses' instructions, Anthropic's system
    for name in ("prompt", "input", "instructions", "system"):
        chars += _text_chars(body.get(name), 0)
    return chars


def _content_chars(content: Any) -> int:
    if content is None or isinstance(content, str | list):
        return _text_chars(content, 0)
    raise InvalidRequest("message content must be a string or a list of parts")


# Text nested deeper than this (content blocks inside tool results inside items) is not counted: the floor and
# the real usage cover it, and the walk stays short whatever a client sends.
_MAX_TEXT_DEPTH = 4


def _text_chars(value: Any, depth: int) -> int:
    """Characters of text in a string, a list of strings or parts, or an item with `text` or `content`."""
    if isinstance(value, str):
        return len(value)
    if depth >= _MAX_TEXT_DEPTH:
        return 0
    if isinstance(value, list):
        return sum(_text_chars(part, depth + 1) for part in value)
    if isinstance(value, dict):
        return _text_chars(value.get("text"), depth + 1) + _text_chars(value.get("content"), depth + 1)
    return 0  # numbers (token ids in an embeddings input), images, null


def estimate_cost(request: CompletionRequest, weight: ModelWeight, settings: EstimateSettings) -> int:
    prompt_tokens = math.ceil(round(request.prompt_chars / settings.chars_per_token * settings.prompt_margin, 9))
    if request.api is ApiKind.EMBEDDINGS:
        completion_tokens = 0  # an embedding has no completion
    elif request.max_tokens is not None:
        completion_tokens = request.max_tokens
    else:
        completion_tokens = settings.default_completion_tokens
    return max(settings.minimum, weighted_cost(prompt_tokens, completion_tokens, weight))
