"""Model weights, the weighted cost, and the pre-request estimate from an OpenAI-style body."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from quotagate.core.errors import InvalidRequest
from quotagate.core.estimate import (
    MAX_TOKENS_CEILING,
    ApiKind,
    CompletionRequest,
    EstimateSettings,
    api_of,
    estimate_cost,
    parse_body,
)
from quotagate.core.model import ModelWeight
from quotagate.core.weights import weight_for, weighted_cost

GPT4 = ModelWeight("gpt-4*", 0.376, 0.376)
GPT35 = ModelWeight("gpt-3.5-turbo*", 0.382, 0.382)
UNIT = ModelWeight("*", 1.0, 1.0)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# -- weight_for ---------------------------------------------------------------------------------------------


def test_weight_for_without_tables_is_the_default_one() -> None:
    w = weight_for("anything")
    assert (w.input, w.output) == (1.0, 1.0)


def test_weight_for_no_match_is_the_default_one() -> None:
    w = weight_for("claude-3-opus", [GPT4, GPT35], [ModelWeight("llama*", 0.1, 0.2)])
    assert (w.input, w.output) == (1.0, 1.0)


def test_weight_for_matches_fnmatch_patterns() -> None:
    assert weight_for("gpt-4o-mini", [GPT35, GPT4]) is GPT4
    assert weight_for("gpt-3.5-turbo-0125", [GPT4, GPT35]) is GPT35
    exact = ModelWeight("o1", 2.0, 3.0)
    assert weight_for("o1", [exact]) is exact
    assert weight_for("o1-mini", [exact]).pattern == "*"  # an exact pattern is not a prefix


def test_weight_for_first_match_in_a_table_wins() -> None:
    specific = ModelWeight("gpt-4o*", 0.5, 1.5)
    broad = ModelWeight("gpt-4*", 0.376, 0.376)
    assert weight_for("gpt-4o", [specific, broad]) is specific
    assert weight_for("gpt-4o", [broad, specific]) is broad


def test_weight_for_plan_table_before_global_table() -> None:
    plan = [ModelWeight("gpt-4*", 0.1, 0.1)]
    global_ = [ModelWeight("gpt-4o", 9.0, 9.0), GPT4]
    # even a more specific global pattern loses to any plan match
    assert weight_for("gpt-4o", plan, global_) is plan[0]


def test_weight_for_falls_back_to_global_when_plan_has_no_match() -> None:
    plan = [ModelWeight("claude*", 0.1, 0.1)]
    assert weight_for("gpt-4-turbo", plan, [GPT4]) is GPT4


def test_weight_for_empty_plan_table_uses_global() -> None:
    assert weight_for("gpt-4", [], [GPT4]) is GPT4


def test_weight_for_is_case_sensitive() -> None:
    assert weight_for("GPT-4", [GPT4]).pattern == "*"


# -- weighted_cost ------------------------------------------------------------------------------------------


def test_weighted_cost_unit_weights_is_the_token_sum() -> None:
    assert weighted_cost(123, 456, UNIT) == 579


def test_weighted_cost_customer_gpt4_factor() -> None:
    # 1000 x 0.376 + 1000 x 0.376 = 752
    assert weighted_cost(1000, 1000, GPT4) == 752


def test_weighted_cost_customer_gpt35_factor() -> None:
    # 1000 x 0.382 + 500 x 0.382 = 573
    assert weighted_cost(1000, 500, GPT35) == 573


def test_weighted_cost_rounds_up() -> None:
    # 10 x 0.376 + 0 = 3.76 -> 4
    assert weighted_cost(10, 0, GPT4) == 4
    # 1 x 0.376 + 1 x 0.376 = 0.752 -> 1
    assert weighted_cost(1, 1, GPT4) == 1
    assert weighted_cost(1, 0, ModelWeight("m", 0.001, 1.0)) == 1


def test_weighted_cost_exact_products_are_not_pushed_up_by_float_noise() -> None:
    tenth = ModelWeight("m", 0.1, 0.1)
    # 3 x 0.1 is 0.30000000000000004 in floats; the cost must still be exactly 1, and 10 x 0.1 exactly 1.
    assert weighted_cost(3, 0, tenth) == 1
    assert weighted_cost(10, 0, tenth) == 1
    assert weighted_cost(7, 3, tenth) == 1
    assert weighted_cost(70, 30, tenth) == 10
    assert weighted_cost(1000, 0, ModelWeight("m", 0.7, 1.0)) == 700


def test_weighted_cost_different_input_and_output_weights() -> None:
    # 200 x 0.5 + 100 x 1.5 = 250
    assert weighted_cost(200, 100, ModelWeight("m", 0.5, 1.5)) == 250


def test_weighted_cost_zero_tokens_costs_nothing() -> None:
    assert weighted_cost(0, 0, GPT4) == 0


def test_weighted_cost_zero_weight_is_free() -> None:
    assert weighted_cost(1000, 1000, ModelWeight("free*", 0.0, 0.0)) == 0


@pytest.mark.parametrize(("prompt", "completion"), [(-1, 0), (0, -1), (-5, -5)])
def test_weighted_cost_negative_tokens_raise(prompt: int, completion: int) -> None:
    with pytest.raises(ValueError):
        weighted_cost(prompt, completion, UNIT)


# -- parse_body ---------------------------------------------------------------------------------------------


def test_parse_body_valid_chat_completion() -> None:
    raw = body(
        model="gpt-4o",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=256,
        stream=True,
    )
    req = parse_body(raw, "/v1/chat/completions")
    assert req == CompletionRequest(
        model="gpt-4o", prompt_chars=len("Be brief.") + len("Hello there"), max_tokens=256, stream=True
    )


def test_parse_body_without_max_tokens_or_stream() -> None:
    req = parse_body(body(model="m", messages=[{"role": "user", "content": "abc"}]))
    assert req is not None
    assert req.max_tokens is None
    assert req.stream is False
    assert req.prompt_chars == 3


def test_parse_body_stream_must_be_true_exactly() -> None:
    for value in ("true", 1, None, False):
        req = parse_body(body(model="m", stream=value))
        assert req is not None and req.stream is False


def test_parse_body_list_of_parts_content() -> None:
    content = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        {"type": "text", "text": " this image"},
    ]
    req = parse_body(body(model="m", messages=[{"role": "user", "content": content}]))
    assert req is not None
    assert req.prompt_chars == len("Describe") + len(" this image")


def test_parse_body_null_content_counts_nothing() -> None:
    req = parse_body(
        body(model="m", messages=[{"role": "assistant", "content": None}, {"role": "user", "content": "x"}])
    )
    assert req is not None and req.prompt_chars == 1


def test_parse_body_counts_unicode_characters_not_bytes() -> None:
    req = parse_body(body(model="m", messages=[{"role": "user", "content": "ação"}]))
    assert req is not None and req.prompt_chars == 4


def test_parse_body_completions_prompt_and_embeddings_input() -> None:
    completions = parse_body(body(model="m", prompt="Once upon a time"))
    embeddings = parse_body(body(model="m", input=["abc", "de"]))
    assert completions is not None and completions.prompt_chars == len("Once upon a time")
    assert embeddings is not None and embeddings.prompt_chars == 5


def test_parse_body_missing_model_is_still_billable() -> None:
    # A body naming no model was free before (a blocked user got 200s); now it is estimated like any other.
    req = parse_body(body(messages=[{"role": "user", "content": "hi"}]), "/v1/chat/completions")
    assert req is not None and req.model == "" and req.prompt_chars == 2 and req.api is ApiKind.CHAT


def test_parse_body_null_model_is_still_billable() -> None:
    req = parse_body(body(model=None))
    assert req is not None and req.model == ""


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t "])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/engines/m/embeddings", "", "/odd"])
def test_parse_body_empty_is_estimated_at_the_floor(raw: bytes, path: str) -> None:
    req = parse_body(raw, path)
    assert req is not None and req.prompt_chars == 0
    settings = EstimateSettings(minimum=37, default_completion_tokens=0)
    assert estimate_cost(req, UNIT, settings) == 37


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/v1/models?x=1"])
@pytest.mark.parametrize("raw", [b"", b'{"model": "m"}'])
def test_listing_models_is_the_only_free_request(path: str, raw: bytes) -> None:
    assert parse_body(raw, path) is None


# -- api_of and the other APIs' bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "model"),
    [
        ("/v1/chat/completions", ApiKind.CHAT, ""),
        ("/chat/completions", ApiKind.CHAT, ""),
        ("/v1/completions", ApiKind.COMPLETIONS, ""),
        ("/embeddings", ApiKind.EMBEDDINGS, ""),
        ("/v1/responses", ApiKind.RESPONSES, ""),
        ("/messages", ApiKind.MESSAGES, ""),
        ("/v1/models", ApiKind.MODELS, ""),
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01", ApiKind.CHAT, "gpt-4o"),
        ("/openai/deployments/gpt-35/completions", ApiKind.COMPLETIONS, "gpt-35"),
        ("/engines/ada/embeddings", ApiKind.EMBEDDINGS, "ada"),
        ("/engines/openai/gpt-4o/chat/completions", ApiKind.CHAT, "openai/gpt-4o"),  # LiteLLM's {model:path}
        ("/engines/gpt%2F4/chat/completions", ApiKind.CHAT, "gpt/4"),
        ("/v1/messages/count_tokens", ApiKind.OTHER, ""),
        ("/openai/deployments/m/responses", ApiKind.OTHER, ""),
        ("", ApiKind.OTHER, ""),
    ],
)
def test_api_of_reads_the_kind_and_the_model_from_the_path(path: str, kind: ApiKind, model: str) -> None:
    assert api_of(path) == (kind, model)


def test_the_paths_model_wins_over_the_bodys() -> None:
    raw = body(model="cheap", messages=[{"role": "user", "content": "hi"}])
    req = parse_body(raw, "/openai/deployments/expensive/chat/completions")
    assert req is not None and (req.model, req.api) == ("expensive", ApiKind.CHAT)
    assert "model" in _invalid_at(body(), "/engines/" + "m" * 257 + "/chat/completions")


def test_anthropic_messages_count_system_and_content_blocks() -> None:
    raw = body(
        model="claude",
        max_tokens=300,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        stream=True,
    )
    req = parse_body(raw, "/v1/messages")
    assert req is not None
    assert (req.api, req.prompt_chars, req.max_tokens, req.stream) == (ApiKind.MESSAGES, 14, 300, True)
    # Anthropic streams always carry their usage: nothing to ask for.
    assert not req.needs_usage_asked


def test_responses_count_instructions_and_input_items() -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}, {"role": "user", "content": "ef"}]
    req = parse_body(body(model="m", instructions="xyz", input=items, max_output_tokens=64, stream=True), "/responses")
    assert req is not None
    assert (req.api, req.prompt_chars, req.max_tokens) == (ApiKind.RESPONSES, 9, 64)
    assert not req.needs_usage_asked
    assert "max_output_tokens" in _invalid_at(body(model="m", max_output_tokens=0), "/v1/responses")


def test_only_chat_and_completions_streams_are_asked_for_their_usage() -> None:
    streamed = body(model="m", stream=True, prompt="p")
    completions = parse_body(streamed, "/v1/completions")
    assert completions is not None and completions.needs_usage_asked
    asked = parse_body(body(model="m", stream=True, stream_options={"include_usage": True}), "/v1/completions")
    assert asked is not None and not asked.needs_usage_asked
    embeddings = parse_body(streamed, "/v1/embeddings")
    assert embeddings is not None and not embeddings.needs_usage_asked


def test_embeddings_estimate_no_completion() -> None:
    req = parse_body(body(model="m", input="x" * 400), "/v1/embeddings")
    assert req is not None
    settings = EstimateSettings(chars_per_token=4.0, prompt_margin=1.0, default_completion_tokens=1000, minimum=1)
    assert estimate_cost(req, UNIT, settings) == 100  # the prompt only; a chat body would add 1000


def test_deeply_nested_input_is_counted_only_near_the_top() -> None:
    nested: Any = "x" * 10
    for _ in range(10):
        nested = [{"content": nested}]
    req = parse_body(body(model="m", input=nested), "/v1/responses")
    assert req is not None and req.prompt_chars == 0


def _invalid_at(raw: bytes, path: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw, path)
    return str(info.value)


def _invalid(raw: bytes) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw)
    text = str(info.value)
    assert text.strip(), "an InvalidRequest must carry a message"
    return text


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "m",}', b"\xff\xfe\x00garbage", b'{"model": "m"'])
def test_parse_body_invalid_json_raises(raw: bytes) -> None:
    assert "JSON" in _invalid(raw)


@pytest.mark.parametrize("raw", [b"[]", b'"gpt-4"', b"42", b"null", b'[{"model": "m"}]'])
def test_parse_body_non_object_raises(raw: bytes) -> None:
    assert "object" in _invalid(raw)


@pytest.mark.parametrize("model", ["", 42, ["gpt-4"], {"name": "gpt-4"}, True, "m" * 257])
def test_parse_body_bad_model_raises(model: Any) -> None:
    assert "model" in _invalid(body(model=model))


def test_parse_body_model_of_256_characters_is_fine() -> None:
    req = parse_body(body(model="m" * 256))
    assert req is not None and len(req.model) == 256


@pytest.mark.parametrize("value", [0, -1, -1000, True, False, "100", 1.5, 100.0, [100], MAX_TOKENS_CEILING + 1, 10**30])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_parse_body_bad_max_tokens_raises(name: str, value: Any) -> None:
    assert name in _invalid(body(model="m", **{name: value}))


@pytest.mark.parametrize("value", [1, 4096, MAX_TOKENS_CEILING])
def test_parse_body_max_tokens_bounds_accepted(value: int) -> None:
    req = parse_body(body(model="m", max_tokens=value))
    assert req is not None and req.max_tokens == value


def test_parse_body_max_completion_tokens_honoured() -> None:
    req = parse_body(body(model="m", max_completion_tokens=333))
    assert req is not None and req.max_tokens == 333


def test_parse_body_null_max_tokens_falls_through_to_max_completion_tokens() -> None:
    req = parse_body(body(model="m", max_tokens=None, max_completion_tokens=77))
    assert req is not None and req.max_tokens == 77


def test_parse_body_messages_not_a_list_raises() -> None:
    assert "messages" in _invalid(body(model="m", messages="hello"))
    assert "messages" in _invalid(body(model="m", messages={"role": "user", "content": "x"}))


def test_parse_body_message_not_an_object_raises() -> None:
    assert "message" in _invalid(body(model="m", messages=["hello"]))


@pytest.mark.parametrize("content", [42, {"text": "x"}, True])
def test_parse_body_bad_content_raises(content: Any) -> None:
    assert "content" in _invalid(body(model="m", messages=[{"role": "user", "content": content}]))


def test_parse_body_deeply_nested_json_is_an_invalid_request_not_a_crash() -> None:
    # A 20 kB body (far below Envoy's 1 MiB max_request_bytes) nested deeper than Python's recursion limit.
    # DESIGN.md: bad input gets a clear error status and message, nothing crashes.
    raw = b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    _invalid(raw)


# -- estimate_cost ------------------------------------------------------------------------------------------

SETTINGS = EstimateSettings()  # 4 chars per token, margin 1.2, 1024 default completion, minimum 100


def req(prompt_chars: int, max_tokens: int | None = None) -> CompletionRequest:
    return CompletionRequest(model="m", prompt_chars=prompt_chars, max_tokens=max_tokens, stream=False)


def test_estimate_settings_defaults() -> None:
    assert (SETTINGS.chars_per_token, SETTINGS.prompt_margin) == (4.0, 1.2)
    assert (SETTINGS.default_completion_tokens, SETTINGS.minimum) == (1024, 100)


def test_estimate_prompt_chars_over_four_with_margin_plus_max_tokens() -> None:
    # 4000 chars / 4 = 1000 tokens, x 1.2 = 1200, + 500 max_tokens
    assert estimate_cost(req(4000, 500), UNIT, SETTINGS) == 1700


def test_estimate_uses_default_completion_tokens_without_max_tokens() -> None:
    # 400 / 4 x 1.2 = 120, + 1024
    assert estimate_cost(req(400), UNIT, SETTINGS) == 1144
    custom = EstimateSettings(default_completion_tokens=64, minimum=0)
    assert estimate_cost(req(400), UNIT, custom) == 184


def test_estimate_prompt_tokens_round_up() -> None:
    # 10 chars / 4 x 1.2 = 3.0 exactly (not pushed to 4 by float noise); 11 chars = 3.3 -> 4
    no_floor = EstimateSettings(minimum=0)
    assert estimate_cost(req(10, 1), UNIT, no_floor) == 3 + 1
    assert estimate_cost(req(11, 1), UNIT, no_floor) == 4 + 1
    assert estimate_cost(req(1, 1), UNIT, no_floor) == 1 + 1


def test_estimate_is_weighted_like_the_charge() -> None:
    # prompt: 4000 / 4 x 1.2 = 1200 tokens; completion 1000; (1200 + 1000) x 0.376 = 827.2 -> 828
    assert estimate_cost(req(4000, 1000), GPT4, SETTINGS) == math.ceil(2200 * 0.376)
    assert estimate_cost(req(4000, 1000), GPT4, SETTINGS) == 828


def test_estimate_separate_input_and_output_weights() -> None:
    w = ModelWeight("m", 0.5, 2.0)
    # prompt 1200 tokens x 0.5 = 600; completion 300 x 2 = 600
    assert estimate_cost(req(4000, 300), w, SETTINGS) == 1200


def test_estimate_never_below_the_floor() -> None:
    assert estimate_cost(req(0, 1), UNIT, SETTINGS) == 100
    assert estimate_cost(req(40, 10), GPT4, SETTINGS) == 100
    assert estimate_cost(req(0, 1), UNIT, EstimateSettings(minimum=20)) == 20


def test_estimate_exactly_at_the_floor_and_one_above() -> None:
    floor = EstimateSettings(minimum=100)
    # 40 chars -> 12 tokens; + 88 = 100; + 89 = 101
    assert estimate_cost(req(40, 88), UNIT, floor) == 100
    assert estimate_cost(req(40, 89), UNIT, floor) == 101


def test_estimate_custom_chars_per_token_and_margin() -> None:
    s = EstimateSettings(chars_per_token=3.0, prompt_margin=1.0, minimum=0)
    assert estimate_cost(req(300, 10), UNIT, s) == 110


def test_estimate_from_a_parsed_body_end_to_end() -> None:
    text = "x" * 1000
    parsed = parse_body(body(model="gpt-4", messages=[{"role": "user", "content": text}], max_tokens=200))
    assert parsed is not None
    # 1000 / 4 x 1.2 = 300 prompt tokens; (300 + 200) x 0.376 = 188
    assert estimate_cost(parsed, weight_for(parsed.model, [GPT4]), SETTINGS) == 188
