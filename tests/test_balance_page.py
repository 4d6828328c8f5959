"""The balance page through a real Envoy: JSON for API clients, HTML for people, for normal, warn, blocked and
suspended users; only the caller's own balance; and a headless chromium screenshot that shows the bar."""

from __future__ import annotations

import asyncio
import html
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from harness import ADMIN_TOKEN, CLIENT_KEY, PERSONAL_KEY, Stack, make_settings
from pngread import hex_colour, near, read_png

from quotagate.core.messages import Language, format_reset
from quotagate.core.model import QuotaState
from quotagate.links import LinkSigner
from quotagate.v1 import admin_pb2
from quotagate.web.page import STATE_COLOURS, TRACK_COLOUR

SECRET = b"test-link-secret"
HTML = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
async def stack(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = make_settings(database_url, redis_url, redis_prefix, link_secret=SECRET.decode())
    async with Stack(settings, tmp_path, ext_proc=True) as running:
        yield running


def creds(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user}


def link(user: str) -> str:
    return LinkSigner(SECRET, "").token(user, datetime.now(UTC))


async def put_in(stack: Stack, user: str, state: QuotaState) -> None:
    """Spends (through Envoy and ext_proc) or suspends until the user is in `state`."""
    spend = {QuotaState.NORMAL: 100, QuotaState.WARN: 820, QuotaState.CRITICAL: 960, QuotaState.BLOCKED: 1000}
    if state is QuotaState.SUSPENDED:
        assert (await stack.chat(user, completion_tokens=300, max_tokens=400)).status_code == 200
        await stack.admin.SuspendAccount(
            admin_pb2.SetAccountStatusRequest(user_id=user, reason="A chargeback was opened."),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )
    else:
        assert (await stack.chat(user, completion_tokens=spend[state], max_tokens=900)).status_code == 200
    for _ in range(100):
        page = await stack.http.get("/v1/quota", headers=creds(user))
        if page.json()["state"] == state.value and page.json()["reserved"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user} is {page.json()}")


@pytest.mark.parametrize("state", [QuotaState.NORMAL, QuotaState.WARN, QuotaState.BLOCKED, QuotaState.SUSPENDED])
async def test_json_and_html_for_each_state(stack: Stack, uid: str, state: QuotaState) -> None:
    await put_in(stack, uid, state)
    data = (await stack.http.get("/v1/quota", headers=creds(uid))).json()
    assert data["state"] == state.value and data["user_id"] == uid
    assert data["allowance"] == 1000 and data["remaining"] == max(0, 1000 - data["used"] + data["credits"])
    assert data["purchase_url"] == "mailto:creditos@example.com"
    # The personal link in the JSON opens the same balance, without the client's credentials.
    by_link = await stack.http.get(data["balance_url"].replace(stack.settings.public_url, ""))
    assert by_link.status_code == 200 and by_link.json()["user_id"] == uid

    page = await stack.http.get("/v1/quota", headers={**creds(uid), **HTML})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    text = page.text
    assert f"background:{STATE_COLOURS[state]}" in text  # the bar's colour says the state
    assert f'data-state="{state.value}"' in text
    assert f'style="width:{min(100.0, data["percent"]):.1f}%"' in text
    assert f"{data['used']:,} of 1,000" in text
    assert f"<dt>Available</dt><dd>{data['remaining']:,}</dd>" in text
    _, balance = await stack.quotagate.service.account(uid)  # type: ignore[union-attr]
    assert format_reset(balance.resets_at, stack.settings.timezone, Language.EN) in text
    assert 'href="mailto:creditos@example.com"' in text
    assert "<script" not in text and "http" not in text.split("</style>")[0]  # self-contained


async def test_format_and_language_can_be_asked_for(stack: Stack, uid: str) -> None:
    await put_in(stack, uid, QuotaState.WARN)
    page = await stack.http.get("/v1/quota", params={"t": link(uid), "format": "html", "lang": "pt-BR"})
    assert page.headers["content-type"].startswith("text/html")
    assert '<html lang="pt-BR">' in page.text and "Seu saldo de tokens" in page.text
    assert "Disponível" in page.text and "escreva para" in page.text
    as_json = await stack.http.get("/v1/quota", params={"t": link(uid), "format": "json"}, headers=HTML)
    assert as_json.json()["state"] == "warn"


async def test_everything_on_the_page_is_escaped(stack: Stack) -> None:
    user = '<img src=x onerror="alert(1)">&amp;'
    page = await stack.http.get("/v1/quota", headers={**creds(user), **HTML})
    assert page.status_code == 200
    assert user not in page.text and html.escape(user) in page.text


async def test_a_purchase_page_is_a_button(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        link_secret=SECRET.decode(),
        public_url="https://chat.example.com",
        stripe={"enabled": True},
    )
    async with Stack(settings, tmp_path, ext_proc=True) as stack:
        await put_in(stack, uid, QuotaState.BLOCKED)
        page = (await stack.http.get("/v1/quota", params={"t": link(uid)}, headers=HTML)).text
        assert '<a class="button" href="https://chat.example.com/v1/quota/purchase?t=' in page
        assert "Buy more tokens" in page


async def test_another_users_balance_is_never_readable(stack: Stack, uid: str) -> None:
    victim = uid + "-victim"
    await put_in(stack, victim, QuotaState.WARN)
    for headers in ({**HTML}, {"x-user-id": victim, **HTML}):
        refused = await stack.http.get("/v1/quota", headers=headers)
        assert refused.status_code == 401 and victim not in refused.text
        assert "personal link" in refused.text  # a person without the link learns where it is
    # An untrusted key naming somebody else: 401, as for chat requests, in JSON and as a page.
    for extra in ({}, HTML):
        other = await stack.http.get(
            "/v1/quota", headers={"authorization": f"Bearer {PERSONAL_KEY}", "x-user-id": victim, **extra}
        )
        assert other.status_code == 401 and "820" not in other.text
    # A link is for the user it was signed for; changing the user in it breaks the signature.
    mine = link(uid).split(".")
    theirs = link(victim).split(".")
    forged = ".".join([theirs[0], mine[1], mine[2]])
    refused = await stack.http.get("/v1/quota", params={"t": forged}, headers=HTML)
    assert refused.status_code == 401 and "link" in refused.text


async def screenshot(url: str, out: Path) -> bytes:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/dev test (it installs it) or apt-get install chromium")
    process = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
        f"--user-data-dir={out.parent / (out.stem + '-profile')}",
        "--window-size=800,700",
        f"--screenshot={out}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(process.wait(), 90) == 0
    return await asyncio.to_thread(out.read_bytes)


@pytest.mark.parametrize("state", [QuotaState.WARN, QuotaState.BLOCKED])
async def test_a_browser_shows_the_bar(stack: Stack, uid: str, state: QuotaState, tmp_path: Path) -> None:
    """Chromium renders the page (from the personal link, through Envoy); in the screenshot the bar's filled
    part has the state's colour and covers the share of the allowance used. The PNG stays in pytest's tmp."""
    await put_in(stack, uid, state)
    percent = (await stack.http.get("/v1/quota", headers=creds(uid))).json()["percent"]
    url = f"http://127.0.0.1:{stack.envoy_port}/v1/quota?{httpx.QueryParams({'t': link(uid)})}"
    image = read_png(await screenshot(url, tmp_path / f"balance-{state.value}.png"))
    assert (image.width, image.height) == (800, 700)

    fill, track = hex_colour(STATE_COLOURS[state]), hex_colour(TRACK_COLOUR)
    # The bar is the row with the most fill + track pixels; its middle row is free of rounded corners.
    counts = [(sum(near(p, fill) for p in row), sum(near(p, track) for p in row)) for row in image.rows]
    bar_rows = [y for y, (f, t) in enumerate(counts) if f + t > 300]
    assert bar_rows, "no bar in the screenshot"
    filled, empty = counts[bar_rows[len(bar_rows) // 2]]
    assert len(bar_rows) >= 20  # 28 px high
    assert filled / (filled + empty) == pytest.approx(min(100.0, percent) / 100, abs=0.02)
    # No other state colour anywhere: the colour is the state's.
    for other, colour in STATE_COLOURS.items():
        if other is not state:
            assert not any(near(p, hex_colour(colour), 2) for row in image.rows for p in row), other
