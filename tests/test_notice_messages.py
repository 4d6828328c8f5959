"""The texts a warned or blocked user reads: the notice in the conversation and the 429 line, which must fit
in 240 characters whatever the link, without ever cutting a link."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from quotagate.core.messages import MAX_MESSAGE_CHARS, Language, MessageKey, format_reset, quota_message
from quotagate.core.notices import SEPARATOR, NoticeFacts, format_tokens, notice_text
from quotagate.core.usage_capture import SseUsageReader, append_to_json_content
from quotagate.links import BALANCE_PATH, PURCHASE_PATH, LinkSigner

NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
RESET = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
SAO_PAULO = ZoneInfo("America/Sao_Paulo")
SIGNER = LinkSigner(b"secret", "https://chat.example.com")
KEYS = (MessageKey.QUOTA_EXHAUSTED, MessageKey.QUOTA_INSUFFICIENT)


def blocked_line(language: Language, key: MessageKey, user: str, *, stripe: bool = True) -> str:
    purchase = SIGNER.url(PURCHASE_PATH, user, NOW) if stripe else "mailto:creditos@example.com"
    return quota_message(
        language,
        key,
        reset=format_reset(RESET, SAO_PAULO, language),
        remaining=0,
        purchase_url=purchase,
        balance_url=SIGNER.balance_url(user, NOW),
    )


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", KEYS)
def test_an_ordinary_user_gets_the_purchase_link_whole(language: Language, key: MessageKey) -> None:
    user = "6566f0c2a1b2c3d4e5f60718"  # a LibreChat user id (MongoDB ObjectId)
    text = blocked_line(language, key, user)
    assert SIGNER.url(PURCHASE_PATH, user, NOW) in text
    assert format_reset(RESET, SAO_PAULO, language) in text
    assert len(text) <= MAX_MESSAGE_CHARS and "\n" not in text


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", KEYS)
def test_the_manual_path_names_the_credits_address(language: Language, key: MessageKey) -> None:
    text = blocked_line(language, key, "u" * 256, stripe=False)
    assert "creditos@example.com" in text and "mailto:" not in text
    assert len(text) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", KEYS)
def test_every_user_id_length_fits_and_no_link_is_ever_cut(language: Language, key: MessageKey) -> None:
    seen = set()
    for length in range(1, 257):
        user = "a.very-long.user@example.com"[:length].ljust(length, "x")
        text = blocked_line(language, key, user)
        assert len(text) <= MAX_MESSAGE_CHARS and "\n" not in text, length
        assert format_reset(RESET, SAO_PAULO, language) in text
        links = re.findall(r"https://\S+?(?=\)|\s|$)", text)
        for link in links:  # whatever link is shown is whole: it verifies to this user
            path, _, token = link.partition("?t=")
            assert path.endswith((PURCHASE_PATH, BALANCE_PATH))
            assert SIGNER.verify(token, NOW) == user
        seen.add("purchase" if PURCHASE_PATH in text else "balance" if links else "none")
    # Short ids get the purchase link, longer ones the balance link, the longest the wording without a link.
    assert seen == {"purchase", "balance", "none"}


def test_the_no_link_wording_points_at_the_notice() -> None:
    text = blocked_line(Language.EN, MessageKey.QUOTA_EXHAUSTED, "x" * 256)
    assert "https://" not in text and "balance link" in text
    assert "link do seu saldo" in blocked_line(Language.PT_BR, MessageKey.QUOTA_EXHAUSTED, "x" * 256)


# -- the notice -----------------------------------------------------------------------------------------


def facts(**overrides: object) -> NoticeFacts:
    values: dict[str, object] = {
        "threshold": "warn",
        "used_fraction": 0.8123,
        "remaining": 187_654,
        "resets_at": RESET,
        "purchase_url": "mailto:creditos@example.com",
        "balance_url": "https://chat.example.com/v1/quota?t=abc",
    }
    values.update(overrides)
    return NoticeFacts(**values)  # type: ignore[arg-type]


def test_numbers_read_as_each_language_writes_them() -> None:
    assert format_tokens(1_234_567, Language.EN) == "1,234,567"
    assert format_tokens(1_234_567, Language.PT_BR) == "1.234.567"
    assert format_tokens(12, Language.PT_BR) == "12"


def test_warn_notice_in_english() -> None:
    text = notice_text(facts(), Language.EN, SAO_PAULO)
    assert text.startswith(SEPARATOR)
    assert "81%" in text and "187,654 left" in text and "2026-12-01 00:00" in text
    assert "write to creditos@example.com" in text
    assert "https://chat.example.com/v1/quota?t=abc" in text


def test_critical_notice_in_portuguese_with_a_purchase_page() -> None:
    text = notice_text(
        facts(threshold="critical", used_fraction=0.97, purchase_url="https://chat.example.com/v1/quota/purchase?t=x"),
        Language.PT_BR,
        SAO_PAULO,
    )
    assert "97%" in text and "Restam 187.654" in text and "01/12/2026 00:00" in text
    assert "acabando" in text and "comprar mais: https://chat.example.com/v1/quota/purchase?t=x" in text


def test_notice_without_a_purchase_path_says_nothing_about_buying() -> None:
    text = notice_text(facts(purchase_url=""), Language.EN, SAO_PAULO)
    assert "buy" not in text.lower() and "Your balance" in text


# -- placing it -----------------------------------------------------------------------------------------


def sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events
    )


def chunk(content: str | None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_hold_done_keeps_back_done_and_what_follows() -> None:
    reader = SseUsageReader(hide_usage=False, hold_done=True)
    stream = sse(chunk("Hi"), chunk(None, "stop"), "[DONE]")
    passed = reader.feed(stream[:20]) + reader.feed(stream[20:])
    assert passed == sse(chunk("Hi"), chunk(None, "stop"))
    assert reader.done_seen and reader.release() == sse("[DONE]") and reader.release() == b""
    extra = json.loads(reader.chunk_event("NOTE")[len(b"data: ") :])
    assert extra["id"] == "chatcmpl-1" and extra["model"] == "m" and extra["created"] == 7
    assert extra["choices"][0]["delta"] == {"content": "NOTE"}
    assert reader.content_chars == 2  # our own chunk is not counted as the provider's content


def test_without_hold_done_the_stream_passes_untouched() -> None:
    reader = SseUsageReader(hide_usage=False)
    stream = sse(chunk("Hi"), "[DONE]")
    assert reader.feed(stream) == stream and reader.done_seen and reader.release() == b""


def test_a_tool_call_ending_is_noticed() -> None:
    reader = SseUsageReader(hide_usage=False, hold_done=True)
    reader.feed(sse(chunk(None, "tool_calls"), "[DONE]"))
    assert reader.ended_with_tools


def test_json_content_gets_the_text_appended() -> None:
    choice = {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    body = json.dumps({"id": "x", "choices": [choice]}).encode()
    changed = append_to_json_content(body, " NOTE")
    assert changed is not None
    assert json.loads(changed)["choices"][0]["message"]["content"] == "Hi NOTE"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        json.dumps({"choices": [{"message": {"content": None, "tool_calls": [{"id": "t"}]}}]}).encode(),
        json.dumps({"choices": [{"message": {"content": "x"}, "finish_reason": "tool_calls"}]}).encode(),
        json.dumps({"data": [{"embedding": [0.1]}]}).encode(),
    ],
)
def test_json_without_a_plain_answer_is_left_alone(body: bytes) -> None:
    assert append_to_json_content(body, "NOTE") is None
