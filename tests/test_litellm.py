"""quotagate in front of a real LiteLLM proxy (mock models, no database), driven by the official openai SDK.

One LiteLLM proxy and one quotagate + Envoy stack serve the whole module (LiteLLM takes seconds to start);
each test uses its own user. LiteLLM reports usage through quotagate.litellm_callback to the module's quotagate.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import openai
import pytest
import yaml
from harness import CLIENT_KEY, USAGE_AUTH, Stack, forget_prefix, make_settings

from quotagate.procs import ManagedProcess, free_port, start_litellm, wait_litellm_ready
from quotagate.up import LITELLM_MISSING
from quotagate.v1 import usage_pb2

MOCK_TEXT = "Hello from the LiteLLM mock model."
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def litellm_test_config() -> dict[str, Any]:
    def mock(name: str, response: str) -> dict[str, Any]:
        params = {"model": f"openai/{name}", "api_key": "mock-provider-key", "mock_response": response}
        return {"model_name": name, "litellm_params": params}

    return {
        "model_list": [
            mock("demo-small", MOCK_TEXT),
            # mock_response names an exception: the provider call "fails" with it.
            mock("demo-broken", "litellm.InternalServerError"),
            mock("demo-flaky", "litellm.InternalServerError"),
        ],
        "litellm_settings": {"callbacks": ["quotagate.litellm_callback.handler"]},
        "router_settings": {"num_retries": 0, "fallbacks": [{"demo-flaky": ["demo-small"]}]},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }


@dataclass
class LiteLLM:
    stack: Stack
    port: int
    master_key: str
    process: ManagedProcess
    database_url: str
    # A second quotagate over the same stores, behind an Envoy with ext_proc, in front of the same LiteLLM:
    # its requests are settled by both paths (ext_proc here, the callback through `stack`).
    both: Stack | None = None

    def client(self, user: str, key: str = CLIENT_KEY, via: Stack | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{(via or self.stack).envoy_port}/v1",
            api_key=key,
            default_headers={"x-user-id": user},
            max_retries=0,
            timeout=30,
        )

    async def usage_event(self, request_id: str, timeout: float = 15.0) -> Mapping[str, Any]:  # noqa: ASYNC109
        """The usage_events row of a request, once LiteLLM's callback (which runs after the response) wrote it."""
        conn = await asyncpg.connect(self.database_url)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    row = await conn.fetchrow("SELECT * FROM usage_events WHERE request_id = $1", request_id)
                    if row is not None:
                        return dict(row)
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def litellm(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiteLLM]:
    tmp = tmp_path_factory.mktemp("litellm")
    master_key = "sk-quotagate-test-" + secrets.token_hex(16)
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"
    # quotagate replaces the client's key by LiteLLM's master key on the way upstream.
    settings = make_settings(database_url, redis_url, prefix, upstream={"api_key": master_key})
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_test_config()), encoding="utf-8")
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master_key,
        "QUOTAGATE_USAGE_TARGET": settings.grpc_listen,
        "QUOTAGATE_USAGE_TOKEN": settings.usage_token,
    }
    process = start_litellm(config, port, tmp / "litellm.log", env=env)
    try:
        # quotagate and Envoy start while LiteLLM is still importing.
        both_settings = make_settings(database_url, redis_url, prefix, upstream={"api_key": master_key})
        async with (
            Stack(settings, tmp, upstream=("127.0.0.1", port)) as stack,
            Stack(both_settings, tmp / "both", upstream=("127.0.0.1", port), ext_proc=True) as both,
        ):
            await wait_litellm_ready(port, timeout=90, process=process)
            yield LiteLLM(stack, port, master_key, process, database_url, both)
    finally:
        process.stop()
        await forget_prefix(redis_url, prefix)


async def test_non_streaming_completion_is_charged_litellms_usage_through_the_callback(
    litellm: LiteLLM, uid: str
) -> None:
    async with litellm.client(uid) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-small", messages=MESSAGES, max_tokens=40
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == MOCK_TEXT
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    request_id = raw.headers["x-request-id"]

    event = await litellm.usage_event(request_id)
    # Envoy's request id and the x-quota-user header reached the callback; the numbers are LiteLLM's.
    assert event["source"] == "litellm"
    assert event["user_id"] == uid
    assert event["model"] == "demo-small"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert event["cost"] == usage.prompt_tokens + usage.completion_tokens
    balance = (await litellm.stack.account(uid)).balance
    assert balance.allowance_used == usage.prompt_tokens + usage.completion_tokens
    assert balance.reserved == 0


async def test_streamed_completion_is_charged_the_usage_of_the_final_chunk(litellm: LiteLLM, uid: str) -> None:
    async with litellm.client(uid) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
        request_id = raw.headers["x-request-id"]
        chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MOCK_TEXT
    # include_usage: LiteLLM passes its usage in the last chunk only.
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    event = await litellm.usage_event(request_id)
    assert event["source"] == "litellm"
    assert event["user_id"] == uid
    assert (event["prompt_tokens"], event["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    balance = (await litellm.stack.account(uid)).balance
    assert balance.allowance_used == usage.prompt_tokens + usage.completion_tokens
    assert balance.reserved == 0


async def test_the_same_request_reported_again_by_the_other_path_is_not_charged_twice(
    litellm: LiteLLM, uid: str
) -> None:
    async with litellm.client(uid) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-small", messages=MESSAGES, max_tokens=40
        )
    usage = raw.parse().usage
    assert usage is not None
    request_id = raw.headers["x-request-id"]
    first = await litellm.usage_event(request_id)
    total = usage.prompt_tokens + usage.completion_tokens

    # What Envoy's ext_proc would report for the same response.
    again = await litellm.stack.usage.ReportUsage(
        usage_pb2.ReportUsageRequest(
            request_id=request_id,
            user_id=uid,
            model="demo-small",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            source="ext_proc",
        ),
        metadata=USAGE_AUTH,
    )
    assert again.charged is False
    assert again.cost == total
    assert (await litellm.stack.account(uid)).balance.allowance_used == total
    assert (await litellm.usage_event(request_id))["recorded_at"] == first["recorded_at"]


async def test_upstream_gets_litellms_master_key_instead_of_the_client_key(litellm: LiteLLM, uid: str) -> None:
    body = {"model": "demo-small", "max_tokens": 40, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{litellm.port}", timeout=30) as direct:
        refused = await direct.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}
        )
        accepted = await direct.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {litellm.master_key}"}
        )
    # LiteLLM without a database knows only its master key.
    assert refused.status_code in (400, 401, 403), refused.text
    assert "error" in refused.json()
    assert accepted.status_code == 200, accepted.text
    # Through Envoy the same client key works: quotagate swapped it for the master key.
    async with litellm.client(uid) as client:
        completion = await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=40)
    assert completion.choices[0].message.content == MOCK_TEXT


async def test_blocked_user_gets_rate_limit_error_with_quotagates_message(litellm: LiteLLM, uid: str) -> None:
    await litellm.stack.report(uid, f"fill-{uuid.uuid4().hex}", prompt=1000)
    async with litellm.client(uid) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=40)
    error = caught.value
    assert error.status_code == 429
    assert isinstance(error.body, dict)
    assert error.body["code"] == "quota_exceeded"
    assert error.body["type"] == "insufficient_quota"
    assert "used all your tokens" in error.body["message"]
    assert "creditos@example.com" in error.body["message"]
    assert error.body["message"] in error.message
    assert error.response.headers["x-quota-state"] == "blocked"


async def test_warn_state_headers_reach_the_sdk(litellm: LiteLLM, uid: str) -> None:
    await litellm.stack.report(uid, f"fill-{uuid.uuid4().hex}", prompt=850)
    async with litellm.client(uid) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-small", messages=MESSAGES, max_tokens=40
        )
    assert raw.status_code == 200
    assert raw.headers["x-quota-state"] == "warn"
    assert raw.headers["x-token-warning"] == "true"
    assert raw.headers["x-quota-limit"] == "1000"
    assert raw.parse().choices[0].message.content == MOCK_TEXT


async def test_failed_completion_is_reported_failed_and_charges_nothing(litellm: LiteLLM, uid: str) -> None:
    async with litellm.client(uid) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="demo-broken", messages=MESSAGES, max_tokens=40)
    request_id = caught.value.response.headers["x-request-id"]
    event = await litellm.usage_event(request_id)
    assert event["status"] == "failed"
    assert event["source"] == "litellm"
    assert event["cost"] == 0
    balance = (await litellm.stack.account(uid)).balance
    assert balance.allowance_used == 0
    assert balance.reserved == 0
    assert balance.remaining == 1000


async def test_failed_attempt_answered_by_a_fallback_is_still_charged(litellm: LiteLLM, uid: str) -> None:
    # LiteLLM calls the per-attempt failure hook before the fallback model answers: that must not settle at zero.
    async with litellm.client(uid) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-flaky", messages=MESSAGES, max_tokens=40
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == MOCK_TEXT
    usage = completion.usage
    assert usage is not None
    event = await litellm.usage_event(raw.headers["x-request-id"])
    assert event["status"] == "succeeded"
    assert event["cost"] == usage.prompt_tokens + usage.completion_tokens > 0
    assert (await litellm.stack.account(uid)).balance.allowance_used == event["cost"]


# -- quotagate up --litellm -------------------------------------------------------------------------------


@pytest.fixture
async def fresh_database_url(server_database_url: str) -> AsyncIterator[str]:
    """An empty database of its own: `quotagate up` loads the demo config's plans and clients into it."""
    name = f"quotagate_up_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(server_database_url)
    yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _read_until(stream: asyncio.StreamReader, marker: str, seconds: float) -> str:
    seen = ""
    async with asyncio.timeout(seconds):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"quotagate up ended before printing {marker!r}:\n{seen}")
            seen += line.decode()
    return seen


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_up_with_litellm_serves_through_envoy_and_stops_litellm_on_ctrl_c(
    tmp_path: Path, fresh_database_url: str, uid: str
) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QUOTAGATE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "quotagate.cli", "up", "--litellm", "--port", str(port)],
        *["--state-dir", str(tmp_path / "state"), "--database-url", fresh_database_url],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    try:
        banner = await _read_until(proc.stdout, "Ctrl-C stops everything.", seconds=120)
        found = re.search(r"LiteLLM proxy http://127\.0\.0\.1:(\d+)", banner)
        assert found is not None, banner
        litellm_port = int(found.group(1))
        assert re.search(r"QUOTAGATE_USAGE_TARGET=127\.0\.0\.1:\d+", banner), banner
        key = re.search(r"master key (sk-quotagate-\w+)", banner)
        assert key is not None, banner

        body = {"model": "demo-small", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}
        headers = {"authorization": "Bearer demo-key", "x-user-id": uid}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            first = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert first.status_code == 200, first.text
            assert first.json()["choices"][0]["message"]["content"] == "Hello from LiteLLM's demo-small mock model."
            assert first.headers["x-quota-state"] == "normal"
            charged = first.json()["usage"]["total_tokens"]
            assert charged > 0
            # The callback settles each request with LiteLLM's figures shortly after its response; a later request
            # then sees them in x-quota-remaining (which leaves out its own reservation).
            sent = 1
            async with asyncio.timeout(15):
                while True:
                    again = await client.post("/v1/chat/completions", json=body, headers=headers)
                    assert again.status_code == 200, again.text
                    if int(again.headers["x-quota-remaining"]) == 300 - sent * charged:
                        break
                    assert again.json()["usage"]["total_tokens"] == charged
                    sent += 1
                    await asyncio.sleep(0.2)
        # The client key is not LiteLLM's: going around Envoy it is refused, the printed master key is not.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{litellm_port}", timeout=30) as direct:
            refused = await direct.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer demo-key"})
            assert refused.status_code in (400, 401, 403)
            accepted = await direct.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key.group(1)}"}
            )
            assert accepted.status_code == 200
        assert await _listening(litellm_port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), timeout=60)
    assert code == 0
    assert not await _listening(port), "Envoy kept running after Ctrl-C"
    assert not await _listening(litellm_port), "LiteLLM kept running after Ctrl-C"


async def test_up_with_litellm_but_without_the_package_says_how_to_install_it(tmp_path: Path) -> None:
    # sys.modules["litellm"] = None makes the package look absent to importlib.
    code = (
        "import sys; sys.modules['litellm'] = None; from quotagate.cli import main; "
        f"sys.exit(main(['up', '--litellm', '--state-dir', {str(tmp_path / 'state')!r}]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1
    assert stdout == b""
    assert stderr.decode().strip() == LITELLM_MISSING
    assert "install quotagate[litellm]" in LITELLM_MISSING
    assert not (tmp_path / "state").exists(), "nothing is started without LiteLLM"


# -- the callback module on its own ---------------------------------------------------------------------------


async def test_quotagate_itself_never_imports_litellm() -> None:
    # Every module but the callback, in a fresh interpreter: LiteLLM is an optional extra.
    code = (
        "import pkgutil, importlib, sys, quotagate\n"
        "names = [m.name for m in pkgutil.walk_packages(quotagate.__path__, 'quotagate.')]\n"
        "assert 'quotagate.litellm_callback' in names and 'quotagate.up' in names, names\n"
        "for name in names:\n"
        "    if name != 'quotagate.litellm_callback':\n"
        "        importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litellm', 'openai')))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == "[]"


async def test_callback_gives_up_after_two_seconds_and_never_raises_into_litellm() -> None:
    # A TCP port that accepts and then says nothing: the gRPC call can only end by its deadline.
    silent: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = """
import asyncio, logging, time
from quotagate.litellm_callback import handler

headers = {"x-request-id": "req-1", "x-quota-user": "user-1", "content-type": "application/json"}
kwargs = {
    "litellm_call_id": "litellm-call-1",
    "model": "demo-small",
    "litellm_params": {"proxy_server_request": {"headers": headers}, "metadata": {"model_group": "demo-small"}},
}

class Response:
    usage = {"prompt_tokens": 3, "completion_tokens": 4}

async def main() -> None:
    for hook in (
        lambda: handler.async_log_success_event(kwargs, Response(), None, None),
        lambda: handler.async_post_call_failure_hook(kwargs, RuntimeError("boom"), None),
    ):
        started = time.monotonic()
        result = await hook()
        print(f"{result} {time.monotonic() - started:.2f}", flush=True)

logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
asyncio.run(main())
"""
    env = {**os.environ, "QUOTAGATE_USAGE_TARGET": f"127.0.0.1:{port}", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        for writer in silent:
            writer.close()
        server.close()
    text = out.decode()
    assert proc.returncode == 0, text
    timings = [line.split() for line in text.splitlines() if line.startswith("None ")]
    assert len(timings) == 2, text
    for _, seconds in timings:
        assert 1.5 <= float(seconds) < 3.5, text
    assert text.count("DEADLINE_EXCEEDED") == 2, text
    assert "req-1" in text


@pytest.fixture(scope="module")
async def litellm_without_callback(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiteLLM]:
    """LiteLLM as deployed without the callback: only Envoy's ext_proc tells quotagate the usage."""
    tmp = tmp_path_factory.mktemp("litellm-ext-proc")
    master_key = "sk-quotagate-test-" + secrets.token_hex(16)
    prefix = f"qgt:{uuid.uuid4().hex[:10]}:"
    settings = make_settings(database_url, redis_url, prefix, upstream={"api_key": master_key})
    port = free_port()
    config = litellm_test_config()
    del config["litellm_settings"]
    (tmp / "litellm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    process = start_litellm(
        tmp / "litellm.yaml", port, tmp / "litellm.log", env={**os.environ, "LITELLM_MASTER_KEY": master_key}
    )
    try:
        async with Stack(settings, tmp, upstream=("127.0.0.1", port), ext_proc=True) as stack:
            await wait_litellm_ready(port, timeout=90, process=process)
            yield LiteLLM(stack, port, master_key, process, database_url)
    finally:
        process.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_ext_proc_alone_charges_litellms_usage(litellm_without_callback: LiteLLM, uid: str, stream: bool) -> None:
    usage, request_id = await _complete(litellm_without_callback, uid, stream=stream)
    event = await litellm_without_callback.usage_event(request_id)
    assert event["source"] == "ext_proc"
    assert event["estimated"] is False
    assert (event["prompt_tokens"], event["completion_tokens"]) == usage
    balance = await _settled_balance(litellm_without_callback.stack, uid)
    assert balance.allowance_used == sum(usage)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_ext_proc_and_the_callback_together_charge_once(litellm: LiteLLM, uid: str, stream: bool) -> None:
    assert litellm.both is not None
    usage, request_id = await _complete(litellm, uid, stream=stream, via=litellm.both)
    first = await litellm.usage_event(request_id)
    assert first["source"] in ("ext_proc", "litellm")
    # Give the slower path time to arrive too; it must find the request settled.
    await asyncio.sleep(1.0)
    balance = await _settled_balance(litellm.both, uid)
    assert balance.allowance_used == sum(usage)
    conn = await asyncpg.connect(litellm.database_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", uid)
    finally:
        await conn.close()
    assert rows == 1


async def _complete(
    litellm: LiteLLM, user: str, *, stream: bool, via: Stack | None = None
) -> tuple[tuple[int, int], str]:
    """One completion through Envoy (the client does not ask for usage); LiteLLM's usage and the request id."""
    async with litellm.client(user, via=via) as client:
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(
                model="demo-small", messages=MESSAGES, max_tokens=40
            )
            completion = raw.parse()
            assert completion.usage is not None
            return (completion.usage.prompt_tokens, completion.usage.completion_tokens), raw.headers["x-request-id"]
        raw_stream = await client.chat.completions.with_raw_response.create(
            model="demo-small", messages=MESSAGES, max_tokens=40, stream=True
        )
        chunks = [chunk async for chunk in raw_stream.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MOCK_TEXT
    assert all(c.usage is None for c in chunks)  # quotagate asked for the usage, and kept it from the client
    # LiteLLM's own figures for the same stream, asked of it directly (its mock counts the same text alike).
    direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{litellm.port}/v1", api_key=litellm.master_key)
    async with direct:
        reference = await direct.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
        last = [chunk async for chunk in reference][-1]
    assert last.usage is not None
    return (last.usage.prompt_tokens, last.usage.completion_tokens), raw_stream.headers["x-request-id"]


async def _settled_balance(stack: Stack, user: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            balance = (await stack.account(user)).balance
            if balance.reserved == 0:
                return balance
            await asyncio.sleep(0.05)
