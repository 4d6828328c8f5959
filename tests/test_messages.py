"""What a denied user reads: one short line (<= 240 characters) in the configured language (DESIGN.md)."""

from __future__ import annotations

import string
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from quotagate.core import messages
from quotagate.core.messages import MAX_MESSAGE_CHARS, Language, MessageKey, format_reset, message

LONG = "x" * 500
LONG_URL = "https://credits.example.com/buy?" + "&".join(f"param{i}=value{i}" for i in range(40))
MULTILINE = "line one\nline two\r\nline three\ttabbed\u2028separated"


def placeholders(language: Language, key: MessageKey) -> set[str]:
    """The field names a text uses, read from the formatter, so every key gets every value it needs."""
    text = messages._TEXTS[language][key]
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def values(fill: str) -> dict[str, object]:
    return {"how": fill, "reset": fill, "remaining": fill, "detail": fill, "seconds": fill}


def assert_one_short_line(text: str) -> None:
    assert text
    assert len(text) <= MAX_MESSAGE_CHARS
    assert "\n" not in text and "\r" not in text
    assert text.splitlines() == [text]
    assert text == text.strip()


def test_limit_is_the_contracts_240() -> None:
    assert MAX_MESSAGE_CHARS == 240


def test_both_languages_ship() -> None:
    assert {lang.value for lang in Language} >= {"pt-BR", "en"}


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", list(MessageKey))
def test_every_message_with_ordinary_values_is_one_short_line(language: Language, key: MessageKey) -> None:
    text = message(
        language,
        key,
        how="mailto:creditos@example.com",
        reset="01/12/2026 00:00",
        remaining=42,
        detail="bad body",
        seconds=37,
    )
    assert_one_short_line(text)
    assert "{" not in text and "}" not in text  # every placeholder was filled


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", list(MessageKey))
@pytest.mark.parametrize("fill", [LONG, LONG_URL, MULTILINE, "\n" * 300])
def test_every_message_with_long_values_is_still_one_short_line(language: Language, key: MessageKey, fill: str) -> None:
    assert_one_short_line(message(language, key, **values(fill)))


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", list(MessageKey))
def test_substituted_values_appear_in_the_text(language: Language, key: MessageKey) -> None:
    names = placeholders(language, key)
    filled = {name: f"<{name}-value>" for name in ("how", "reset", "remaining", "detail", "seconds")}
    text = message(language, key, **filled)
    for name in names:
        assert f"<{name}-value>" in text


@pytest.mark.parametrize("key", list(MessageKey))
def test_pt_br_differs_from_en(key: MessageKey) -> None:
    filled = values("V")
    assert message(Language.PT_BR, key, **filled) != message(Language.EN, key, **filled)


def test_quota_messages_say_what_to_do() -> None:
    # DESIGN.md: what happened and what to do (buy credits / write to the credits address / wait for the reset).
    for language in Language:
        for key in (MessageKey.QUOTA_EXHAUSTED, MessageKey.QUOTA_INSUFFICIENT):
            text = message(language, key, how="mailto:c@example.com", reset="RESET-DATE", remaining=7)
            assert "mailto:c@example.com" in text
            assert "RESET-DATE" in text
    assert "7" in message(Language.EN, MessageKey.QUOTA_INSUFFICIENT, how="h", reset="r", remaining=7)


def test_suspended_message_names_where_to_write() -> None:
    for language in Language:
        assert "support@example.com" in message(language, MessageKey.ACCOUNT_SUSPENDED, how="support@example.com")


def test_multiline_value_is_flattened_to_spaces() -> None:
    text = message(Language.EN, MessageKey.INVALID_BODY, detail="first\nsecond")
    assert "first second" in text


def test_truncated_text_ends_with_an_ellipsis_at_exactly_the_limit() -> None:
    text = message(Language.EN, MessageKey.INVALID_BODY, detail=LONG)
    assert len(text) == MAX_MESSAGE_CHARS
    assert text.endswith("…")


# -- format_reset ---------------------------------------------------------------------------------------


SAO_PAULO = ZoneInfo("America/Sao_Paulo")


def test_format_reset_shows_the_local_date_in_sao_paulo() -> None:
    resets_at = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # midnight local
    assert format_reset(resets_at, SAO_PAULO, Language.EN).startswith("2026-12-01")
    assert format_reset(resets_at, SAO_PAULO, Language.PT_BR).startswith("01/12/2026")
    assert "00:00" in format_reset(resets_at, SAO_PAULO, Language.EN)
    assert "00:00" in format_reset(resets_at, SAO_PAULO, Language.PT_BR)


def test_format_reset_local_date_differs_from_the_utc_date() -> None:
    # 2027-01-01 02:00 UTC is still 2026-12-31 23:00 in São Paulo.
    at = datetime(2027, 1, 1, 2, 0, tzinfo=UTC)
    assert format_reset(at, SAO_PAULO, Language.EN).startswith("2026-12-31")
    assert "23:00" in format_reset(at, SAO_PAULO, Language.EN)
    assert format_reset(at, SAO_PAULO, Language.PT_BR).startswith("31/12/2026")
    assert format_reset(at, ZoneInfo("UTC"), Language.EN).startswith("2027-01-01")


def test_format_reset_accepts_any_aware_input() -> None:
    at = datetime(2026, 12, 1, 0, 0, tzinfo=SAO_PAULO)
    assert format_reset(at, ZoneInfo("UTC"), Language.EN).startswith("2026-12-01")
    assert "03:00" in format_reset(at, ZoneInfo("UTC"), Language.EN)


@pytest.mark.parametrize("language", list(Language))
def test_format_reset_is_short_and_one_line(language: Language) -> None:
    text = format_reset(datetime(2026, 12, 1, 3, tzinfo=UTC), SAO_PAULO, language)
    assert "\n" not in text and len(text) <= 40
