"""Property-based fuzzing (hypothesis) of Check, ReportUsage, ShouldRateLimit and every Admin call against a
running `quotagate serve` with real PostgreSQL and Redis: broken UTF-8, huge and negative numbers, giant
bodies and headers, missing fields. Check and ShouldRateLimit go, example by example, to the decision port (the
unary server Envoy calls) or to the grpc.aio port. Every call ends in a clean status (never UNKNOWN or INTERNAL, never
UNAVAILABLE with healthy stores), rejected inputs charge nothing, and the server answers health afterwards.

Requests are built as messages, serialized, and then may have placeholders swapped for invalid UTF-8 bytes of
the same length (protobuf's length prefixes stay right), which no protobuf library would let a client send.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2
from harness import ADMIN_TOKEN, CLIENT_KEY, ENVOY_AUTH, PERSONAL_KEY, USAGE_AUTH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import kill_group, start_served

from quotagate.v1 import admin_pb2, usage_pb2

# Swapped after serialization for bytes that are not UTF-8 (same length, 6 bytes).
BAD_MARK = "\x01BAD\x01\x01"
BAD_BYTES = b"\xff\xfe\xc3\x28\x80\xc0"
assert len(BAD_MARK.encode()) == len(BAD_BYTES)

CLEAN_CALL_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a message over the server's receive limit
}
# QUOTAGATE_FUZZ_EXAMPLES runs a deeper search (e.g. 2000) by hand; the suite keeps to a bounded run.
MAX_EXAMPLES = int(os.environ.get("QUOTAGATE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=False,
)
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


# -- the server under test (its own database, so odd accounts stay out of the other tests' way) -------------


@dataclass
class Target:
    address: str
    database_url: str
    health: Callable[..., int]
    decision_address: str = ""

    def of(self, port: str) -> str:
        return self.decision_address if port == "decision" else self.address


# Where Envoy's two calls are sent: the unary server (decision port) or grpc.aio.
PORTS = st.sampled_from(["decision", "grpc"])


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="module")
async def target(
    server_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Target]:
    name = f"quotagate_fuzz_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database_url = _with_database(server_database_url, name)
    prefix = f"qgfuzz:{uuid.uuid4().hex[:8]}:"
    config = {
        "reservation_ttl_seconds": 3600,  # nothing expires (and is charged) while fuzzing
        "plans": [{"id": "small", "monthly_allowance": 1000}],
        "default_plan": "small",
    }
    served = await start_served(
        tmp_path_factory.mktemp("fuzz"), database_url, redis_url, prefix, "--log-level", "WARNING", config=config
    )

    def health(address: str = served.target) -> int:
        with grpc.insecure_channel(address) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply: health_pb2.HealthCheckResponse = check(health_pb2.HealthCheckRequest(), timeout=10)
            return int(reply.status)

    try:
        yield Target(served.target, database_url, health, served.decision_target)
        code = await served.terminate()
        log = served.text()
        assert code == 0, log[-3000:]
        assert "unexpected error" not in log, log[-3000:]
    finally:
        kill_group(served)
        admin = await asyncpg.connect(server_database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class Ledger:
    """What a charge would change: usage events and ledger entries, read through a connection of its own."""

    def __init__(self, database_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(asyncpg.connect(database_url))

    def totals(self) -> tuple[int, int, int]:
        row = self._loop.run_until_complete(
            self._conn.fetchrow(
                """SELECT (SELECT count(*) FROM usage_events), (SELECT coalesce(sum(cost), 0) FROM usage_events),
                          (SELECT count(*) FROM ledger_entries)"""
            )
        )
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


@pytest.fixture
def ledger(target: Target) -> Any:
    probe = Ledger(target.database_url)
    yield probe
    probe.close()


def call(address: str, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> tuple[Any, bytes]:
    """One unary call with raw bytes in and out; returns (status code, response bytes or b"")."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        rpc = channel.unary_unary(method)  # no serializers: the bytes go as they are
        try:
            return grpc.StatusCode.OK, rpc(payload, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), b""


def raw(message: Message) -> bytes:
    return message.SerializeToString().replace(BAD_MARK.encode(), BAD_BYTES)


# -- strategies ---------------------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.just(BAD_MARK),
    st.text(max_size=8).map(lambda t: f"{t}{BAD_MARK}{t}"),
    st.integers(300, 70_000).map(lambda n: "x" * n),  # far over every id limit
    st.sampled_from(["\x00", "a\nb", "\u202e", "💥" * 100, " ", "2026-11", "csv", "day", "model", "admin"]),
)
big_ints = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([-(2**63), -1, 0, 1, 999_999_999, 1_000_000_001, 2**31, 2**53 + 1, 2**63 - 1]),
)


def _field_strategy(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == field.TYPE_STRING:
        single: st.SearchStrategy[Any] = texts
    elif kind == field.TYPE_BYTES:
        single = st.binary(max_size=64)
    elif kind == field.TYPE_BOOL:
        single = st.booleans()
    elif kind in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64):
        single = big_ints
    elif kind in (field.TYPE_UINT64, field.TYPE_FIXED64):
        single = st.integers(0, 2**64 - 1)
    elif kind in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_SFIXED32, field.TYPE_ENUM):
        single = st.integers(-(2**31), 2**31 - 1) if kind != field.TYPE_ENUM else st.integers(-3, 12)
    elif kind in (field.TYPE_UINT32, field.TYPE_FIXED32):
        single = st.integers(0, 2**32 - 1)
    elif kind in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        single = st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == field.TYPE_FLOAT else 64)
    elif kind == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        return st.nothing()  # no map fields in these requests; left out rather than half supported
    elif kind == field.TYPE_MESSAGE and depth < 3:
        single = message_dicts(field.message_type, depth + 1)
    else:
        return st.nothing()
    if field.is_repeated:
        return st.lists(single, max_size=3)
    return single


def message_dicts(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the message's fields (missing fields included), each with hostile values."""
    fields = {f.name: _field_strategy(f, depth) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields)


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    _fill(message, values)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == field.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                sub = getattr(message, name)
                sub.SetInParent()
                _fill(sub, value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


def assert_health(target: Target) -> None:
    assert target.health() == health_pb2.HealthCheckResponse.SERVING


# -- Check ----------------------------------------------------------------------------------------------------

header_names = st.one_of(
    st.sampled_from(["authorization", "x-user-id", "x-request-id", "x-user-email", "x-user-name", "content-type"]),
    st.text(min_size=1, max_size=20),
)
auth_values = st.one_of(
    st.sampled_from([f"Bearer {CLIENT_KEY}", f"Bearer {PERSONAL_KEY}", f"bearer  {CLIENT_KEY} ", "Bearer", "Basic x"]),
    texts,
)
json_numbers = st.one_of(
    big_ints, st.integers(-(2**80), 2**80), st.floats(allow_nan=False), st.text(max_size=5), st.none(), st.booleans()
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.text(max_size=30), st.integers(), st.none()),
        "max_tokens": json_numbers,
        "max_completion_tokens": json_numbers,
        "stream": st.one_of(st.booleans(), st.text(max_size=3)),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={"role": st.text(max_size=10), "content": st.one_of(st.text(max_size=200), json_numbers)},
                ),
                max_size=4,
            ),
            st.text(max_size=10),
            st.none(),
        ),
    },
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    chat_bodies,
    st.binary(max_size=300),  # broken UTF-8 and not JSON at all
    st.integers(10_000, 6_000_000).map(
        lambda n: b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"' + b"a" * n + b'"}]}'
    ),
    st.just(b""),
)


@st.composite
def check_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A CheckRequest (as bytes) and whether it could legitimately be allowed."""
    headers: dict[str, str] = draw(st.dictionaries(header_names, texts, max_size=6))
    if draw(st.booleans()):
        headers["authorization"] = draw(auth_values)
    if draw(st.booleans()):
        headers["x-user-id"] = draw(st.one_of(st.just("fuzz-user"), texts))
    if draw(st.integers(0, 9)) == 0:
        headers["x-giant"] = "h" * draw(st.integers(10_000, 1_000_000))
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=draw(st.sampled_from(["POST", "GET", "", BAD_MARK])),
        path=draw(st.sampled_from(["/v1/chat/completions", "/", "", BAD_MARK])),
        headers=headers,
    )
    body = draw(bodies)
    if draw(st.booleans()):
        http.raw_body = body
    elif draw(st.booleans()):
        http.body = body.decode("utf-8", errors="replace")
    request = external_auth_pb2.CheckRequest()
    if draw(st.integers(0, 9)) > 0:  # sometimes no attributes at all
        request.attributes.request.http.CopyFrom(http)
    return raw(request), headers.get("authorization", "").strip() == f"Bearer {CLIENT_KEY}"


@FUZZ
@given(case=check_requests(), port=PORTS)
def test_check_answers_every_request_cleanly(
    target: Target, ledger: Ledger, case: tuple[bytes, bool], port: str
) -> None:
    payload, _ = case
    before = ledger.totals()
    code, reply = call(target.of(port), "/envoy.service.auth.v3.Authorization/Check", payload, ENVOY_AUTH)
    assert code in CLEAN_CALL_CODES, code
    if code is grpc.StatusCode.OK:
        response = external_auth_pb2.CheckResponse.FromString(reply)
        assert response.status.code in (
            code_pb2.OK,
            code_pb2.UNAUTHENTICATED,
            code_pb2.INVALID_ARGUMENT,
            code_pb2.PERMISSION_DENIED,
            code_pb2.RESOURCE_EXHAUSTED,
        ), response
        if response.status.code != code_pb2.OK:
            assert 400 <= response.denied_response.status.code < 500
    assert ledger.totals() == before  # Check holds a reservation in Redis at most; it never charges


# -- ReportUsage ----------------------------------------------------------------------------------------------


@FUZZ
@given(values=message_dicts(usage_pb2.ReportUsageRequest.DESCRIPTOR))
def test_report_usage_refuses_bad_reports_and_charges_nothing_for_them(
    target: Target, ledger: Ledger, values: dict[str, Any]
) -> None:
    request = build(usage_pb2.ReportUsageRequest, values)
    before = ledger.totals()
    code, reply = call(target.address, "/quotagate.v1.Usage/ReportUsage", raw(request), USAGE_AUTH)
    assert code in CLEAN_CALL_CODES, (code, values)
    after = ledger.totals()
    if code is not grpc.StatusCode.OK:
        assert after == before, values
        return
    # Accepted: only sane numbers and ids get this far, and the charge is what the response says.
    response = usage_pb2.ReportUsageResponse.FromString(reply)
    assert 0 <= request.prompt_tokens <= 1_000_000_000 and 0 <= request.completion_tokens <= 1_000_000_000
    assert request.request_id.strip() and len(request.request_id.strip()) <= 256
    assert after[1] - before[1] == (response.cost if response.charged else 0)


# -- ShouldRateLimit ------------------------------------------------------------------------------------------


@FUZZ
@given(
    values=message_dicts(rls_pb2.RateLimitRequest.DESCRIPTOR), user=st.one_of(texts, st.just("fuzz-user")), port=PORTS
)
def test_should_rate_limit_answers_every_request_cleanly(
    target: Target, ledger: Ledger, values: dict[str, Any], user: str, port: str
) -> None:
    request = build(rls_pb2.RateLimitRequest, values)
    if user:  # also a request that matches the shipped limits
        request.domain = request.domain or "quotagate"
        request.descriptors.add().entries.add(key="user", value=user)
    before = ledger.totals()
    path = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    code, reply = call(target.of(port), path, raw(request), ENVOY_AUTH)
    assert code in CLEAN_CALL_CODES, (code, values)
    if code is grpc.StatusCode.OK:
        response = rls_pb2.RateLimitResponse.FromString(reply)
        assert response.overall_code in (rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT)
    assert ledger.totals() == before


# -- Admin ----------------------------------------------------------------------------------------------------

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
ADMIN_METHODS = sorted(ADMIN_SERVICE.methods, key=lambda m: m.name)


@st.composite
def admin_calls(draw: st.DrawFn) -> tuple[pb_descriptor.MethodDescriptor, dict[str, Any], bool]:
    method = draw(st.sampled_from(ADMIN_METHODS))
    values = draw(message_dicts(method.input_type))
    return method, values, draw(st.integers(0, 9)) > 0


@FUZZ
@given(case=admin_calls())
def test_admin_answers_every_call_cleanly(
    target: Target, ledger: Ledger, case: tuple[pb_descriptor.MethodDescriptor, dict[str, Any], bool]
) -> None:
    method, values, with_token = case
    request = build(message_factory.GetMessageClass(method.input_type), values)
    path = f"/{ADMIN_SERVICE.full_name}/{method.name}"
    metadata = ADMIN_METADATA if with_token else ()
    payload = raw(request)
    before = ledger.totals()
    if method.server_streaming:
        code = stream_call(target.address, path, payload, metadata)
    else:
        code, _ = call(target.address, path, payload, metadata)
    assert code in CLEAN_CALL_CODES, (code, method.name, values)
    if not with_token:  # refused before anything else, unless the bytes themselves are unreadable
        assert code is (grpc.StatusCode.INVALID_ARGUMENT if BAD_BYTES in payload else grpc.StatusCode.UNAUTHENTICATED)
    after = ledger.totals()
    assert after[:2] == before[:2]  # no usage is ever charged through Admin
    if code is not grpc.StatusCode.OK:
        assert after == before, (method.name, values)


def stream_call(address: str, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> Any:
    with grpc.insecure_channel(address) as channel:
        rpc = channel.unary_stream(method)
        try:
            for _ in rpc(payload, metadata=metadata, timeout=30):
                pass
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


# -- afterwards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["decision", "grpc"])
def test_the_server_still_answers_health_after_the_fuzzing(target: Target, port: str) -> None:
    assert_health(target)
    assert target.health(target.of(port)) == health_pb2.HealthCheckResponse.SERVING
    code, reply = call(
        target.of(port),
        "/envoy.service.auth.v3.Authorization/Check",
        raw(
            external_auth_pb2.CheckRequest(
                attributes=attribute_context_pb2.AttributeContext(
                    request=attribute_context_pb2.AttributeContext.Request(
                        http=attribute_context_pb2.AttributeContext.HttpRequest(
                            headers={"authorization": f"Bearer {CLIENT_KEY}", "x-user-id": f"fuzz-after-{port}"},
                            raw_body=b'{"model":"m","max_tokens":5,"messages":[]}',
                        )
                    )
                )
            )
        ),
        ENVOY_AUTH,
    )
    assert code is grpc.StatusCode.OK
    assert external_auth_pb2.CheckResponse.FromString(reply).status.code == code_pb2.OK
