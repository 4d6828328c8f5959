"""How ext_proc streams end: Envoy resets each one as soon as it has the last answer, and that must leave nothing
behind in quotagate, neither asyncio tasks nor grpc's native batches (the soak's memory growth). Every test runs
against both servers that answer ext_proc: the decision port's unary server (where the shipped Envoy config
sends it) and the grpc.aio port (an Envoy config that points every call at it)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc._cython import cygrpc
from harness import ADMIN_TOKEN, CLIENT_KEY, ENVOY_AUTH, Stack, make_settings

from quotagate.adapters.ext_proc import RESET_WAIT_SECONDS
from quotagate.v1 import admin_pb2

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
NEAR_PLAN = "ext-proc-streams-near"


@pytest.fixture(params=["unary", "grpc.aio"])
async def stack(
    request: pytest.FixtureRequest, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    plans = [
        {"id": "ext-proc-streams", "monthly_allowance": 10**9},
        # Every request past a threshold: Check sends each answer to the ext_proc filter that holds it.
        {"id": NEAR_PLAN, "monthly_allowance": 10**6, "warn_threshold": 0.000001, "critical_threshold": 0.000002},
    ]
    settings = make_settings(database_url, redis_url, redis_prefix, plans=plans)
    # decision_port 0: Envoy sends every call to the grpc.aio port.
    options = {} if request.param == "unary" else {"decision_port": 0}
    async with Stack(settings, tmp_path, ext_proc=True, envoy_options=options) as running:
        yield running


def on_grpc_aio(stack: Stack) -> bool:
    return stack.envoy_options.get("decision_port") == 0


def ext_proc_channel(stack: Stack) -> grpc.aio.Channel:
    """A channel to the port this stack's Envoy sends ext_proc to."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port if on_grpc_aio(stack) else stack.decision_port}")


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts grpc.aio's batches in this process by their operations, and those that failed or were cancelled.

    grpcio frees a batch's native operations only when the awaiting coroutine sees it succeed (grpc#43360); a
    failed or cancelled batch is leaked. grpc's Cython looks execute_batch up as a module global at each call,
    so wrapping it here sees every batch of the in-process server."""
    counts: Counter[str] = Counter()
    original = cygrpc.execute_batch

    async def execute_batch(call: Any, operations: tuple[Any, ...], loop: Any) -> Any:
        kind = "+".join(type(op).__name__.removesuffix("Operation") for op in operations)
        counts[kind] += 1
        try:
            return await original(call, operations, loop)
        except BaseException as exc:
            counts[f"{kind}: {type(exc).__name__}"] += 1
            raise

    monkeypatch.setattr(cygrpc, "execute_batch", execute_batch)
    return counts


def _failed(counts: Counter[str]) -> dict[str, int]:
    return {kind: n for kind, n in counts.items() if ": " in kind}


def _call_tasks() -> set[asyncio.Task[Any]]:
    """Tasks that belong to one RPC (grpc.aio's per-call coroutines) or to an ext_proc stream (its settlement, its
    last write), as opposed to the servers' and connections' own."""

    def per_call(task: asyncio.Task[Any]) -> bool:
        coro = task.get_coro()
        name, qualname = getattr(coro, "__name__", ""), getattr(coro, "__qualname__", "") or ""
        return name in {"_schedule_rpc_coro", "_handle_exceptions"} or qualname.startswith(
            ("ExternalProcessorService.", "_ServicerContext.", "Connection._call")
        )

    return {task for task in asyncio.all_tasks() if per_call(task)}


@pytest.mark.parametrize("route", ["held", "watched"])
async def test_streams_leave_no_batch_or_task_behind(stack: Stack, batches: Counter[str], uid: str, route: str) -> None:
    request = {"model": "demo-small", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": uid, "x-demo-completion-tokens": "3"}
    if route == "held":
        # Near a threshold Check routes the answers to the filter that holds them (a client's own x-quota-*
        # headers are removed by Check).
        await stack.admin.UpsertAccount(
            admin_pb2.UpsertAccountRequest(user_id=uid, plan=NEAR_PLAN, reason="Held answers for this test."),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )
        batches.clear()  # that call's own batches are not the streams'

    async def client(n: int) -> None:
        for _ in range(n):
            response = await stack.http.post("/v1/chat/completions", json=request, headers=headers)
            assert response.status_code == 200, response.text

    await asyncio.gather(*(client(40) for _ in range(4)))
    # Every stream is over once Envoy's reset has cancelled its handler (or the pause has run out), and its
    # settlement, started as the handler ends, has run.
    deadline = time.monotonic() + RESET_WAIT_SECONDS + 5
    while (running := _call_tasks()) and time.monotonic() < deadline:
        await asyncio.wait(running, timeout=deadline - time.monotonic())
    assert not _call_tasks()

    if not on_grpc_aio(stack):
        assert sum(batches.values()) == 0  # the unary server's streams use no grpc batches at all
    elif route == "held":
        # Envoy resets a held stream as soon as it has the last answer. The wrapper did see the streams' writes
        # (three answers each: request headers, response headers, body).
        assert batches["SendInitialMetadata+SendMessage"] >= 160
        assert batches["SendMessage"] >= 160
        assert batches["SendStatusFromServer"] == 0  # no status raced Envoy's reset
    else:
        # A watched stream gets no answers; quotagate ends it with a status once the body is over, before Envoy
        # would (it keeps a watched stream open for 5 s after the body).
        assert batches["SendInitialMetadata+SendMessage"] == batches["SendMessage"] == 0
        assert batches["SendInitialMetadata+SendStatusFromServer"] >= 160
    # Before the fix 91 of these 160 held streams ended with a status batch that failed on the reset call, and
    # two with a write cancelled in flight: native memory grpc never frees, either way.
    assert _failed(batches) == {}
    account = await stack.account(uid)
    assert account.balance.reserved == 0  # every completion was settled all the same
    assert account.balance.allowance_used == 160 * (1 + 3)


def _headers(values: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])


async def test_a_client_that_half_closes_and_waits_gets_the_status(stack: Stack, batches: Counter[str]) -> None:
    async with ext_proc_channel(stack) as channel:
        await half_close_and_wait(channel, batches)


async def half_close_and_wait(channel: grpc.aio.Channel, batches: Counter[str]) -> None:
    process = channel.stream_stream(
        PROCESS,
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )
    call = process(metadata=ENVOY_AUTH)
    # No x-request-id nor user: not a completion, so the response headers are the last thing it asks for.
    await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers({":path": "/x"}))))
    assert (await call.read()).HasField("request_headers")
    await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_headers({":status": "200"}))))
    assert (await call.read()).HasField("response_headers")
    started = time.monotonic()
    await call.done_writing()  # Envoy with its graceful close on: half-close, then wait for the status
    assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK
    # Under the one second Envoy waits for it.
    assert time.monotonic() - started < 1.0
    assert _failed(batches) == {}


async def test_a_message_that_does_not_parse_is_invalid_argument(stack: Stack) -> None:
    async with ext_proc_channel(stack) as channel:
        process = channel.stream_stream(PROCESS)  # raw bytes both ways
        call = process(metadata=ENVOY_AUTH)
        await call.write(b"\x0a\xff")  # field 1, length 255, and nothing after it
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
