"""Every route Envoy forwards is metered at what its answer reports, or refused (issue 14, item 2).

Through the real parts, the way a client would go around the meter: each API LiteLLM serves (chat completions,
legacy completions, embeddings, Responses, Anthropic Messages; with and without /v1; the Azure-style paths that
name the model in the path), streamed and not, against the demo upstream (known usage) and a real LiteLLM proxy
in mock mode. A blocked user meets 429 on every route, listing models included; any other path gets Envoy's own
404 and reaches nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from harness import CLIENT_KEY, Stack, forget_prefix, make_settings

from quotagate.procs import ManagedProcess, free_port, start_litellm, wait_litellm_ready
from quotagate.reconcile import reconcile
from quotagate.v1 import admin_pb2

PROMPT = "x" * 40  # the demo upstream counts ceil(40 / 4) = 10 prompt tokens
COMPLETION = 7  # x-demo-completion-tokens
ALLOWANCE = 100_000
# demo-large costs more, so a charge at the path's model (not the body's demo-small) shows in the balance.
LARGE = {"pattern": "demo-large", "input": 2.0, "output": 3.0}


def cost_of(model: str, prompt: int, completion: int) -> int:
    if model == "demo-large":
        return prompt * 2 + completion * 3
    return prompt + completion


@dataclass(frozen=True)
class Route:
    """One way to ask for a completion: the path, the API it speaks, and the model the path names."""

    path: str
    api: str
    path_model: str = ""

    @property
    def model(self) -> str:
        return self.path_model or "demo-small"


def routes() -> list[Route]:
    found: list[Route] = []
    for prefix in ("/v1", ""):
        found += [Route(f"{prefix}/{name}", api) for name, api in API_PATHS]
    for prefix in ("/openai/deployments", "/engines"):
        for name, api in API_PATHS[:3]:  # LiteLLM serves chat, completions and embeddings under these
            found.append(Route(f"{prefix}/demo-large/{name}", api, "demo-large"))
    return found


API_PATHS = [
    ("chat/completions", "chat"),
    ("completions", "completions"),
    ("embeddings", "embeddings"),
    ("responses", "responses"),
    ("messages", "messages"),
]


def request_body(api: str, *, stream: bool, model: str | None = "demo-small", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {} if model is None else {"model": model}
    if api in ("chat", "messages"):
        body["messages"] = [{"role": "user", "content": PROMPT}]
        body["max_tokens"] = 50
    elif api == "completions":
        body.update(prompt=PROMPT, max_tokens=50)
    elif api == "embeddings":
        body["input"] = PROMPT
    else:
        body.update(input=PROMPT, max_output_tokens=50)
    if stream:
        body["stream"] = True
    return {**body, **extra}


def headers(user: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": user, **extra}


def sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        payload = "".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:"))
        if payload and payload != "[DONE]":
            events.append(json.loads(payload))
    return events


def reported_usage(response: httpx.Response) -> tuple[int, int] | None:
    """The (prompt, completion) tokens the answer itself reports, in whatever shape its API uses; None when the
    client does not see it (a stream quotagate asked for its usage on the client's behalf)."""
    if response.headers["content-type"].startswith("application/json"):
        usage = response.json()["usage"]
        if "prompt_tokens" in usage:
            return usage["prompt_tokens"], usage.get("completion_tokens") or 0
        return usage["input_tokens"], usage["output_tokens"]
    prompt: int | None = None
    completion: int | None = None
    for event in sse_events(response.text):
        kind = event.get("type")
        if kind == "message_start":
            prompt = event["message"]["usage"]["input_tokens"]
        elif kind == "message_delta":
            completion = event["usage"]["output_tokens"]
        elif kind == "response.completed":
            usage = event["response"]["usage"]
            prompt, completion = usage["input_tokens"], usage["output_tokens"]
        elif isinstance(event.get("usage"), dict):
            prompt, completion = event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"]
    return None if prompt is None or completion is None else (prompt, completion)


async def usage_events(stack: Stack, user: str) -> list[dict[str, Any]]:
    assert stack.quotagate is not None
    events: list[dict[str, Any]] = await stack.quotagate.service.ledger.usage_events(user)  # type: ignore[attr-defined]
    return events


async def settled(stack: Stack, user: str) -> tuple[admin_pb2.Account, list[dict[str, Any]]]:
    """The account and its usage rows once ext_proc has settled (it does just after the answer's end)."""
    deadline = time.monotonic() + 10
    while True:
        account = await stack.account(user)
        events = await usage_events(stack, user)
        if account.balance.reserved == 0 and events:
            return account, events
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled: {account.balance} {events}")
        await asyncio.sleep(0.05)


# -- against the demo upstream: every route, streamed and not, at known usage -------------------------------


@pytest.fixture(scope="module")
async def demo(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"
    plan = f"redteam-{uuid.uuid4().hex[:6]}"
    settings = make_settings(
        database_url,
        redis_url,
        prefix,
        plans=[{"id": plan, "monthly_allowance": ALLOWANCE}],
        model_weights=[LARGE],
    )
    try:
        async with Stack(settings, tmp_path_factory.mktemp("redteam"), ext_proc=True) as stack:
            yield stack
    finally:
        await forget_prefix(redis_url, prefix)


METERED = [(route, stream) for route in routes() for stream in (False, True) if route.api != "embeddings" or not stream]


@pytest.mark.parametrize(("route", "stream"), METERED, ids=[f"{r.path}{'-stream' if s else ''}" for r, s in METERED])
async def test_each_route_is_charged_what_its_answer_reported(
    demo: Stack, uid: str, route: Route, stream: bool
) -> None:
    response = await demo.http.post(
        route.path,
        json=request_body(route.api, stream=stream),
        headers=headers(uid, **{"x-demo-completion-tokens": str(COMPLETION)}),
    )
    assert response.status_code == 200, response.text
    completion = 0 if route.api == "embeddings" else COMPLETION
    seen = reported_usage(response)
    if seen is not None:  # what the client sees is what is charged
        assert seen == (10, completion)
    else:  # a chat or completions stream that did not ask: quotagate asked, and kept the usage from the client
        assert route.api in ("chat", "completions") and stream
        assert "usage" not in response.text
    account, [event] = await settled(demo, uid)
    assert (event["prompt_tokens"], event["completion_tokens"]) == (10, completion)
    assert (event["model"], event["source"], event["estimated"]) == (route.model, "ext_proc", False)
    assert event["request_id"] == response.headers["x-request-id"]
    expected = cost_of(route.model, 10, completion)
    assert (event["cost"], account.balance.allowance_used, account.balance.reserved) == (expected, expected, 0)


@pytest.mark.parametrize("route", [r for r in routes() if r.api in ("chat", "completions")], ids=lambda r: r.path)
async def test_streams_that_asked_for_their_usage_are_charged_it_and_see_it(
    demo: Stack, uid: str, route: Route
) -> None:
    body = request_body(route.api, stream=True, stream_options={"include_usage": True})
    response = await demo.http.post(
        route.path, json=body, headers=headers(uid, **{"x-demo-completion-tokens": str(COMPLETION)})
    )
    assert reported_usage(response) == (10, COMPLETION)
    account, [event] = await settled(demo, uid)
    assert (event["prompt_tokens"], event["completion_tokens"], event["model"]) == (10, COMPLETION, route.model)
    assert account.balance.allowance_used == cost_of(route.model, 10, COMPLETION)


async def test_a_body_without_a_model_on_a_path_model_route_is_charged_the_paths_model(demo: Stack, uid: str) -> None:
    response = await demo.http.post(
        "/openai/deployments/demo-large/chat/completions?api-version=2024-02-01",
        json=request_body("chat", stream=False, model=None),
        headers=headers(uid, **{"x-demo-completion-tokens": str(COMPLETION)}),
    )
    assert response.status_code == 200, response.text
    account, [event] = await settled(demo, uid)
    assert (event["model"], event["prompt_tokens"], event["completion_tokens"]) == ("demo-large", 10, COMPLETION)
    assert account.balance.allowance_used == cost_of("demo-large", 10, COMPLETION) == 41


async def test_listing_models_is_free_but_checked(demo: Stack, uid: str) -> None:
    for path in ("/v1/models", "/models"):
        response = await demo.http.get(path, headers=headers(uid))
        assert response.status_code == 200, response.text
        assert [m["id"] for m in response.json()["data"]] == ["demo-small", "demo-large"]
        assert response.headers["x-quota-state"] == "normal"  # Check answered
    account = await demo.account(uid)
    assert (account.balance.allowance_used, account.balance.reserved) == (0, 0)
    assert await usage_events(demo, uid) == []


def blocked_attempts() -> list[tuple[str, str, dict[str, Any] | None]]:
    attempts: list[tuple[str, str, dict[str, Any] | None]] = [("GET", "/v1/models", None), ("GET", "/models", None)]
    for route in routes():
        attempts.append(("POST", route.path, request_body(route.api, stream=False)))
        attempts.append(("POST", route.path, request_body(route.api, stream=True, model=None)))
    # The bodies that used to be free: no model, no body at all.
    attempts.append(("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    attempts.append(("POST", "/openai/deployments/demo-large/chat/completions", None))
    return attempts


async def test_a_blocked_user_gets_429_on_every_route_and_nothing_reaches_the_upstream(demo: Stack, uid: str) -> None:
    await demo.report(uid, f"fill-{uuid.uuid4().hex}", prompt=ALLOWANCE)
    before = await demo.account(uid)
    assert before.balance.state == "blocked"
    for method, path, body in blocked_attempts():
        response = await demo.http.request(method, path, json=body, headers=headers(uid))
        assert response.status_code == 429, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "quota_exceeded"), (path, error)
        assert error["message"]
    reached = [r for r in await demo.upstream_requests() if r["headers"].get("x-quota-user") == uid]
    assert reached == []
    after = await demo.account(uid)
    assert (after.balance.allowance_used, after.balance.reserved) == (ALLOWANCE, 0)
    assert len(await usage_events(demo, uid)) == 1  # the fill only


async def test_a_suspended_user_still_gets_403_on_free_and_metered_routes(demo: Stack, uid: str) -> None:
    await demo.report(uid, f"seen-{uuid.uuid4().hex}", prompt=1)  # the account exists
    await demo.admin.SuspendAccount(
        admin_pb2.SetAccountStatusRequest(user_id=uid, reason="Red team: suspended users stay out."),
        metadata=[("authorization", "Bearer test-admin-token")],
    )
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/engines/demo-large/embeddings", request_body("embeddings", stream=False)),
    ]:
        response = await demo.http.request(method, path, json=body, headers=headers(uid))
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["code"] == "account_suspended"


UNKNOWN_PATHS = [
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/openai/v1/responses"),
    ("GET", "/v1/responses/resp_123"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v2/chat/completions"),
    ("POST", "/openai/deployments/demo-large/responses"),
    ("POST", "/v1/models"),
    ("GET", "/"),
    ("GET", "/_demo/requests"),  # the upstream's own pages are not reachable through Envoy
    ("POST", "/key/generate"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN_PATHS, ids=[f"{m} {p}" for m, p in UNKNOWN_PATHS])
async def test_an_unknown_path_gets_envoys_404_and_reaches_nothing(
    demo: Stack, uid: str, method: str, path: str
) -> None:
    body = request_body("chat", stream=True)
    # Check's routing marks, forged, open no other path either.
    forged = headers(uid, **{"x-quota-ask-usage": "1", "x-quota-settle-first": "1"})
    for extra in ({}, forged):
        response = await demo.http.request(method, path, json=body, headers={**headers(uid), **extra})
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_url")
        assert error["message"]
        assert "x-quota-state" not in response.headers  # Check was not asked
    recorded = await demo.upstream_requests()
    assert all(r["headers"].get("x-user-id") != uid for r in recorded)
    assert all(r["path"] != path for r in recorded if path != "/v1/models")


# -- against a real LiteLLM proxy in mock mode ---------------------------------------------------------------

MOCK_TEXT = "Hello from the LiteLLM mock model."


@dataclass
class LiteLLM:
    stack: Stack
    process: ManagedProcess


@pytest.fixture(scope="module")
async def litellm(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiteLLM]:
    tmp = tmp_path_factory.mktemp("redteam-litellm")
    master_key = "sk-quotagate-redteam-" + secrets.token_hex(16)
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"

    def mock(name: str, model: str, response: str) -> dict[str, Any]:
        params = {"model": model, "api_key": "mock-provider-key", "mock_response": response}
        return {"model_name": name, "litellm_params": params}

    # No usage callback: what is charged here is only what quotagate read from the answers (ext_proc).
    config = {
        "model_list": [
            mock("demo-small", "openai/demo-small", MOCK_TEXT),
            mock("demo-large", "openai/demo-large", MOCK_TEXT),
            mock("demo-embed", "openai/text-embedding-3-small", "unused"),
        ],
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    process = start_litellm(path, port, tmp / "litellm.log", env={**os.environ, "LITELLM_MASTER_KEY": master_key})
    settings = make_settings(
        database_url,
        redis_url,
        prefix,
        plans=[{"id": f"redteam-llm-{uuid.uuid4().hex[:6]}", "monthly_allowance": ALLOWANCE}],
        model_weights=[LARGE],
        upstream={"api_key": master_key},
    )
    try:
        async with Stack(settings, tmp / "stack", upstream=("127.0.0.1", port), ext_proc=True) as stack:
            await wait_litellm_ready(port, timeout=120, process=process)
            yield LiteLLM(stack, process)
    finally:
        process.stop()
        await forget_prefix(redis_url, prefix)


def litellm_cases() -> list[tuple[str, str, str, bool]]:
    """(path, api, the model the request is for, streamed) for every route LiteLLM serves from the list."""
    cases: list[tuple[str, str, str, bool]] = []
    for prefix in ("/v1", ""):
        for name, api in API_PATHS:
            model = "demo-embed" if api == "embeddings" else "demo-small"
            streams = (False,) if api == "embeddings" else (False, True)
            cases += [(f"{prefix}/{name}", api, model, stream) for stream in streams]
    for prefix in ("/openai/deployments", "/engines"):
        for name, api in API_PATHS[:3]:
            model = "demo-embed" if api == "embeddings" else "demo-large"
            streams = (False,) if api == "embeddings" else (False, True)
            cases += [(f"{prefix}/{model}/{name}", api, model, stream) for stream in streams]
    return cases


LITELLM_CASES = litellm_cases()


@pytest.mark.parametrize(
    ("path", "api", "model", "stream"),
    LITELLM_CASES,
    ids=[f"{p}{'-stream' if s else ''}" for p, _, _, s in LITELLM_CASES],
)
async def test_each_litellm_route_is_charged_what_litellm_reported_or_refused(
    litellm: LiteLLM, uid: str, path: str, api: str, model: str, stream: bool
) -> None:
    stack = litellm.stack
    body = request_body(api, stream=stream, model="demo-small" if "/demo-large/" in path else model)
    if stream and api in ("chat", "completions"):
        body["stream_options"] = {"include_usage": True}  # so the test sees what LiteLLM reported
    response = await stack.http.post(path, json=body, headers=headers(uid))
    if response.status_code >= 400:
        # Refused (by LiteLLM here: its mock does not stream every API): nothing is charged, nothing held.
        await asyncio.sleep(0.3)
        account = await stack.account(uid)
        assert (account.balance.allowance_used, account.balance.reserved) == (0, 0), response.text
        assert all(e["cost"] == 0 for e in await usage_events(stack, uid))
        assert (path, stream) in LITELLM_REFUSES, (path, stream, response.status_code, response.text[:300])
        return
    assert response.status_code == 200
    assert (path, stream) not in LITELLM_REFUSES
    seen = reported_usage(response)
    assert seen is not None and seen[0] > 0, response.text[:300]
    account, [event] = await settled(stack, uid)
    assert (event["prompt_tokens"], event["completion_tokens"]) == seen
    assert (event["model"], event["estimated"], event["source"]) == (model, False, "ext_proc")
    expected = cost_of(model, *seen)
    assert (account.balance.allowance_used, account.balance.reserved) == (expected, 0)


# LiteLLM 1.x's mock answers a streamed Responses request with a 500, and LiteLLM serves Anthropic's Messages only
# under /v1 (404 without): refused, so they must cost nothing.
LITELLM_REFUSES = {("/v1/responses", True), ("/responses", True), ("/messages", False), ("/messages", True)}


async def test_the_issues_two_undercharges_are_gone(litellm: LiteLLM, uid: str) -> None:
    """/v1/messages was charged 1 token for the 2,598 LiteLLM reported, /v1/responses 7 for 123."""
    stack = litellm.stack
    messages = await stack.http.post("/v1/messages", json=request_body("messages", stream=False), headers=headers(uid))
    usage = messages.json()["usage"]
    total = usage["input_tokens"] + usage["output_tokens"]
    assert total > 100
    account, _ = await settled(stack, uid)
    assert account.balance.allowance_used == total
    responses = await stack.http.post(
        "/v1/responses", json=request_body("responses", stream=False), headers=headers(uid)
    )
    total += responses.json()["usage"]["total_tokens"]
    deadline = time.monotonic() + 10
    while (await stack.account(uid)).balance.allowance_used != total:
        assert time.monotonic() < deadline, "the Responses answer was not charged its usage"
        await asyncio.sleep(0.05)


async def test_a_blocked_user_gets_429_from_every_litellm_route(litellm: LiteLLM, uid: str) -> None:
    stack = litellm.stack
    await stack.report(uid, f"fill-{uuid.uuid4().hex}", prompt=ALLOWANCE)
    paths = sorted({p for p, _, _, _ in LITELLM_CASES})
    for path in [*paths, "/v1/models"]:
        api = next((a for p, a, _, _ in LITELLM_CASES if p == path), "")
        method, body = ("GET", None) if path == "/v1/models" else ("POST", request_body(api, stream=False, model=None))
        response = await stack.http.request(method, path, json=body, headers=headers(uid))
        assert response.status_code == 429, (path, response.text)
        assert response.json()["error"]["type"] == "insufficient_quota"
    account = await stack.account(uid)
    assert (account.balance.allowance_used, account.balance.reserved) == (ALLOWANCE, 0)


async def test_an_unknown_litellm_path_is_refused_by_envoy(litellm: LiteLLM, uid: str) -> None:
    # LiteLLM serves these, but quotagate does not meter them: Envoy answers itself.
    for path in ("/openai/v1/responses", "/v1/audio/speech", "/key/generate", "/v1/messages/count_tokens"):
        body = request_body("responses", stream=False)
        response = await litellm.stack.http.post(path, json=body, headers=headers(uid))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_url"
        assert "x-litellm-version" not in response.headers  # LiteLLM never saw it


async def test_zz_reconcile_finds_no_drift_after_every_route(demo: Stack, litellm: LiteLLM) -> None:
    # Redis and the ledger agree for every account these attacks touched, behind the demo upstream and LiteLLM.
    for stack in (demo, litellm.stack):
        assert stack.quotagate is not None
        report = await reconcile(stack.quotagate.service, repair=False)
        assert report.checked > 0
        assert report.drift == []
