"""Security promises: an untrusted key speaks only for its own user, the client key never reaches the upstream,
admin tokens are kept hashed and compared in constant time, no secret is ever logged (even at DEBUG), and every
SQL statement is parameterised."""

from __future__ import annotations

import ast
import asyncio
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import code_pb2
from harness import ADMIN_TOKEN, CLIENT_KEY, PERSONAL_KEY, USAGE_AUTH, Stack, make_settings
from served import check_once, check_request, kill_group, start_served

import quotagate
from quotagate.adapters import admin as admin_adapter
from quotagate.adapters.errors import Unauthenticated
from quotagate.config import parse_settings, sha256_hex
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc

UPSTREAM_KEY = "sk-upstream-secret-5c1e"
VIEWER_TOKEN = "viewer-token-secret-77a1"
WRONG_TOKEN = "wrong-admin-token-secret-90b2"
WRONG_KEY = "wrong-client-key-secret-1f3d"


# -- who may speak for whom, and what the upstream sees -------------------------------------------------------


async def test_untrusted_key_cannot_assert_another_user_and_the_client_key_never_reaches_upstream(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix)
    async with Stack(settings, tmp_path) as stack:
        # The personal (untrusted) key names someone else: 401, and no account is created for that someone.
        for asserted in (uid, "personal-user2", "PERSONAL-USER"):
            response = await stack.chat(asserted, key=PERSONAL_KEY)
            assert response.status_code == 401, (asserted, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
        conn = await asyncpg.connect(database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", uid) == 0
        finally:
            await conn.close()
        # Without x-user-id, or naming itself, it acts for its own user.
        assert (await stack.chat(None, key=PERSONAL_KEY)).status_code == 200
        assert (await stack.chat("personal-user", key=PERSONAL_KEY)).status_code == 200
        assert (await stack.chat(uid)).status_code == 200  # the trusted key may name anyone

        upstream = await stack.upstream_requests()
        assert len(upstream) == 3
        for request in upstream:
            text = repr(request)
            assert CLIENT_KEY not in text and PERSONAL_KEY not in text
            headers = {k.lower(): v for k, v in request["headers"].items()}
            assert "authorization" not in headers  # no upstream key configured: the client's is removed
        assert [r["headers"].get("x-quota-user") for r in upstream] == ["personal-user", "personal-user", uid]


async def test_with_an_upstream_key_the_upstream_gets_that_key_instead(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(database_url, redis_url, redis_prefix, upstream={"api_key": UPSTREAM_KEY})
    async with Stack(settings, tmp_path) as stack:
        response = await stack.chat(uid)
        assert response.status_code == 200
        assert UPSTREAM_KEY not in repr(dict(response.headers))  # nor does the client see the upstream's key
        (request,) = await stack.upstream_requests()
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert CLIENT_KEY not in repr(request)


# -- admin tokens -----------------------------------------------------------------------------------------------


class _Metadata:
    """The one method of grpc.aio.ServicerContext that authorize() reads."""

    def __init__(self, token: str) -> None:
        self._token = token

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),)


def test_admin_tokens_are_kept_as_digests_and_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings(
        {
            "admin_tokens": [{"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"}],
            "clients": [{"name": "chat", "key": CLIENT_KEY, "trusted": True}],
            "upstream": {"api_key": UPSTREAM_KEY},
        },
        "<test>",
        {"QUOTAGATE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    # Only digests are kept: the plain token and client key are nowhere in the settings.
    assert {t.token_sha256 for t in settings.admin_tokens} == {sha256_hex(VIEWER_TOKEN), sha256_hex(ADMIN_TOKEN)}
    dump = repr(settings)
    assert ADMIN_TOKEN not in dump and VIEWER_TOKEN not in dump and CLIENT_KEY not in dump
    assert UPSTREAM_KEY not in dump  # kept (it is sent upstream) but never printed with the settings

    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin_adapter.hmac, "compare_digest", spy)
    found = admin_adapter.authorize(settings, _Metadata(VIEWER_TOKEN), "viewer")  # type: ignore[arg-type]
    assert found.name == "viewer-bot"
    # Every known token is compared (no early exit), always digest against digest.
    assert len(compared) == len(settings.admin_tokens) == 2
    assert all(b == sha256_hex(VIEWER_TOKEN) for _, b in compared)
    assert {a for a, _ in compared} == {t.token_sha256 for t in settings.admin_tokens}

    compared.clear()
    with pytest.raises(Unauthenticated):
        admin_adapter.authorize(settings, _Metadata(WRONG_TOKEN), "viewer")  # type: ignore[arg-type]
    assert len(compared) == 2
    # No `==` on token digests in the admin adapter: the only comparison is compare_digest.
    source = Path(admin_adapter.__file__).read_text()
    assert "token_sha256 ==" not in source and "== digest" not in source


# -- secrets never logged ---------------------------------------------------------------------------------------


async def test_no_secret_reaches_the_logs_even_at_debug(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    config = {
        "upstream": {"api_key": UPSTREAM_KEY},
        "admin_tokens": [{"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"}],
        # A plan id of its own: plans are seeded once per database, and "small" is the other tests' plan.
        "plans": [{"id": "security-tiny", "monthly_allowance": 60}],
        "default_plan": "security-tiny",
        "estimate": {"minimum": 10, "default_completion_tokens": 20},
    }
    served = await start_served(
        tmp_path, database_url, redis_url, redis_prefix, "--log-level", "DEBUG", config=config
    )
    secrets = [CLIENT_KEY, PERSONAL_KEY, ADMIN_TOKEN, VIEWER_TOKEN, WRONG_TOKEN, WRONG_KEY, UPSTREAM_KEY]
    try:
        target = served.target
        codes = []
        for key, user in (
            (CLIENT_KEY, uid),  # allowed (and the upstream key goes into the answer)
            (PERSONAL_KEY, uid),  # untrusted key naming someone else
            (WRONG_KEY, uid),  # unknown key
            (CLIENT_KEY + "x", uid),  # a near miss
            (CLIENT_KEY, None),  # trusted key without a user
            (None, uid),  # no key
        ):
            codes.append((await check_once(target, check_request(key, user))).status.code)
        bad_body = check_request(CLIENT_KEY, uid, body=b'{"model": "x", "messages": [')
        codes.append((await check_once(target, bad_body)).status.code)
        for _ in range(8):  # spend the small allowance: quota denials are logged too
            codes.append((await check_once(target, check_request(CLIENT_KEY, f"{uid}-spender"))).status.code)
        assert code_pb2.OK in codes and code_pb2.UNAUTHENTICATED in codes
        assert code_pb2.INVALID_ARGUMENT in codes and code_pb2.RESOURCE_EXHAUSTED in codes

        async with grpc.aio.insecure_channel(target) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            created = await admin.CreateClientKey(
                admin_pb2.CreateClientKeyRequest(name=f"{uid}-k", trusted=True, reason="For the log test."),
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            )
            secrets.append(created.secret)
            assert (await check_once(target, check_request(created.secret, uid))).status.code == code_pb2.OK
            await admin.RevokeClientKey(
                admin_pb2.RevokeClientKeyRequest(name=f"{uid}-k", reason="The log test is done with it."),
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            )
            await asyncio.sleep(0.6)
            revoked = await check_once(target, check_request(created.secret, uid))
            assert revoked.status.code == code_pb2.UNAUTHENTICATED
            for token in (WRONG_TOKEN, VIEWER_TOKEN):  # unknown, then too low a role
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await admin.GrantCredits(
                        admin_pb2.GrantCreditsRequest(user_id=uid, amount=10, reason="A viewer is not allowed this."),
                        metadata=[("authorization", f"Bearer {token}")],
                    )
                assert failed.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            account = await admin.GetAccount(
                admin_pb2.GetAccountRequest(user_id=uid), metadata=[("authorization", f"Bearer {VIEWER_TOKEN}")]
            )
            assert account.user_id == uid
            usage = usage_pb2_grpc.UsageStub(channel)
            await usage.ReportUsage(
                usage_pb2.ReportUsageRequest(request_id=f"{uid}-r", user_id=uid, model="m", prompt_tokens=3),
                metadata=USAGE_AUTH,
            )
        assert await served.terminate() == 0
    finally:
        kill_group(served)
    log = served.text()
    # The capture works and is verbose: DEBUG lines, the account creation, the shutdown.
    assert '"level": "debug"' in log and "account created" in log and "stopping" in log, log[-2000:]
    leaked = [s for s in secrets if s in log]
    assert not leaked, f"secrets in the log: {leaked}"


# -- SQL --------------------------------------------------------------------------------------------------------

SQL_WORDS = re.compile(
    r"\b(SELECT\s.+?\sFROM|INSERT\s+INTO|UPDATE\s+\w+(\s+AS\s+\w+)?\s+SET|DELETE\s+FROM)\b", re.I | re.S
)
# The packaged migration files are SQL text run as they are; nothing else may run non-constant SQL.
ALLOWED_DYNAMIC = {("postgres.py", "migrate", "sql")}
SQL_CALLS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "cursor", "prepare", "copy_records_to_table"}


def _literal_text(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join("{}" if isinstance(v, ast.FormattedValue) else _literal_text(v) for v in node.values)
    return ""


def _imported_modules(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


class SqlScan:
    """Finds SQL text that a value could be formatted into. Interpolation is allowed only of names bound to
    constant text (module constants, or locals whose every assignment is constant text): column lists and
    fixed fragments, never data."""

    def __init__(self, tree: ast.Module, where: str) -> None:
        self.problems: list[str] = []
        self._where = where
        self._module = self._constants(tree.body, set())
        # The statement-argument rule applies to modules that talk to PostgreSQL (aiohttp has a prepare() too).
        self._uses_asyncpg = "asyncpg" in _imported_modules(tree)

    def _constants(self, body: list[ast.stmt], known: set[str]) -> set[str]:
        assigned: dict[str, list[ast.expr]] = {}
        for stmt in body:
            for node in ast.walk(stmt) if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) else ():
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(node.value)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                    assigned.setdefault(node.target.id, []).append(node.value)
        constant = set(known)
        changed = True
        while changed:  # names built from other constant names
            changed = False
            for name, values in assigned.items():
                if name not in constant and all(self._is_constant(v, constant) for v in values):
                    constant.add(name)
                    changed = True
        return constant

    def _is_constant(self, node: ast.expr, constant: set[str]) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | int | float)
        if isinstance(node, ast.Name):
            return node.id in constant
        if isinstance(node, ast.JoinedStr):
            return all(
                self._is_constant(v.value if isinstance(v, ast.FormattedValue) else v, constant) for v in node.values
            )
        if isinstance(node, ast.IfExp):
            return self._is_constant(node.body, constant) and self._is_constant(node.orelse, constant)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._is_constant(node.left, constant) and self._is_constant(node.right, constant)
        return False

    def scan(self, tree: ast.Module) -> list[str]:
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            local = self._constants(func.body, self._module)
            local |= {name for file, fn, name in ALLOWED_DYNAMIC if (file, fn) == (self._where, func.name)}
            self._check(func, local, f"{self._where}:{func.name}")
        return sorted(set(self.problems))

    def _check(self, scope: ast.AST, constant: set[str], where: str) -> None:
        for node in ast.walk(scope):
            line = f"{where}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.JoinedStr) and SQL_WORDS.search(_literal_text(node)):
                if not self._is_constant(node, constant):
                    self.problems.append(f"{line}: a value formatted into SQL")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                if SQL_WORDS.search(_literal_text(node.left)) and not self._is_constant(node, constant):
                    self.problems.append(f"{line}: SQL built with % or +")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "format" and SQL_WORDS.search(_literal_text(node.func.value)):
                    self.problems.append(f"{line}: SQL built with .format()")
                receiver = node.func.value
                on_cursor = isinstance(receiver, ast.Name) and receiver.id == "cursor"  # cursor.fetch(n): a count
                if (
                    self._uses_asyncpg
                    and node.func.attr in SQL_CALLS
                    and not on_cursor
                    and node.args
                    and not self._is_constant(node.args[0], constant)
                ):
                    self.problems.append(f"{line}: {node.func.attr}() of a statement that is not constant text")


def sql_problems(source: str, where: str = "<src>") -> list[str]:
    tree = ast.parse(source)
    return SqlScan(tree, where).scan(tree)


def _sources() -> Iterator[Path]:
    root = Path(quotagate.__file__).parent
    yield from (p for p in sorted(root.rglob("*.py")) if "v1" not in p.relative_to(root).parts)


def test_every_sql_statement_in_src_is_parameterised() -> None:
    problems: list[str] = []
    statements = 0
    for path in _sources():
        source = path.read_text()
        statements += len(re.findall(r"\b(SELECT|INSERT INTO|DELETE FROM|UPDATE \w+ SET)\b", source))
        problems += sql_problems(source, path.name)
    assert statements > 50  # the scan does see the ledger's SQL
    assert not problems, "\n".join(problems)


def test_the_sql_scan_catches_formatting_of_values() -> None:
    bad = '''
import asyncpg
COLUMNS = "a, b"
async def f(conn, user_id, table, flag):
    await conn.fetch(f"SELECT {COLUMNS} FROM t WHERE u = '{user_id}'")
    await conn.execute("DELETE FROM t WHERE u = '%s'" % user_id)
    await conn.execute("UPDATE t SET x = 1 WHERE u = {}".format(user_id))
    query = "SELECT a FROM t WHERE u = '" + user_id + "'"
    await conn.fetchrow(query)
    order = "a" if flag else table
    await conn.fetch(f"SELECT a FROM t ORDER BY {order}")
'''
    problems = sql_problems(bad)
    assert len([p for p in problems if "formatted into SQL" in p]) == 2, problems
    assert any("% or +" in p for p in problems) and any(".format()" in p for p in problems)
    assert any("fetchrow() of a statement" in p for p in problems)
    good = '''
COLUMNS = "a, b"
MORE = f"{COLUMNS}, c"
async def f(conn, user_id, by_day):
    period = "to_char(at, 'YYYY')" if by_day else "''"
    await conn.fetch(f"SELECT {MORE}, {period} FROM t WHERE u = $1", user_id)
    await conn.execute("DELETE FROM t WHERE u = $1", user_id)
'''
    assert sql_problems(good) == []
