"""Red team, as an attacker on the network would try it: guessing admin tokens on the real gRPC port, and forging a
personal balance link for a `quotagate up` deployment on the real HTTP port."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from harness import ADMIN_TOKEN, deploy_env, make_settings

from quotagate.config import DEFAULT_LINK_SECRET, load_settings, sha256_hex
from quotagate.core.clock import FixedClock
from quotagate.core.model import Plan
from quotagate.links import BALANCE_PATH, LinkSigner
from quotagate.server import Running, start
from quotagate.up import demo_config_path, with_own_link_secret
from quotagate.v1 import admin_pb2, admin_pb2_grpc

NOW = datetime(2026, 11, 10, 12, tzinfo=UTC)
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
BUDGET = 5
WINDOW = 60


def guess(i: int) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer guess-{i:04d}")]


async def refusal(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """The status, message and retry-after trailer of a call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())
        return exc.code(), exc.details() or "", str(trailers.get("retry-after", ""))
    raise AssertionError("the call was accepted")


async def auth_failures(http: httpx.AsyncClient, running: Running) -> dict[str, float]:
    text = (await http.get(f"http://127.0.0.1:{running.http_port}/metrics")).text
    found = re.findall(r'^quotagate_admin_auth_failures_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {reason: float(value) for reason, value in found}


async def test_guessing_admin_tokens_blocks_the_peer_even_for_the_right_token_until_the_window_passes(
    database_url: str, redis_url: str, redis_prefix: str, uid: str
) -> None:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin={"failed_auth": {"max_failures": BUDGET, "window_seconds": WINDOW}},
    )
    clock = FixedClock(NOW)
    running = await start(settings, clock=clock)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port}") as channel,
            httpx.AsyncClient(timeout=10) as http,
        ):
            admin = admin_pb2_grpc.AdminStub(channel)
            reason = "Red team: credits while tokens are guessed."
            await admin.UpsertAccount(admin_pb2.UpsertAccountRequest(user_id=uid, reason=reason), metadata=ADMIN)
            grant = admin_pb2.GrantCreditsRequest(user_id=uid, amount=100, reason=reason)

            # Within the budget a wrong token is just unknown, and the right one is served as always (and is not
            # counted: successes neither spend nor refill the budget).
            for i in range(BUDGET - 1):
                assert await refusal(admin.GrantCredits(grant, metadata=guess(i))) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown admin token",
                    "",
                )
            await admin.GrantCredits(grant, metadata=ADMIN)

            # A burst of guesses at once: the last try of the budget is compared, every other one is refused.
            burst = await asyncio.gather(
                *(refusal(admin.GrantCredits(grant, metadata=guess(100 + i))) for i in range(40))
            )
            messages = [details for _, details, _ in burst]
            assert messages.count("unknown admin token") == 1
            assert messages.count(f"too many failed attempts, retry after {WINDOW} s") == 39
            assert {code for code, _, _ in burst} == {grpc.StatusCode.UNAUTHENTICATED}

            # Blocked: the right token too, and from a new connection (another source port, the same IP).
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port}") as other:
                other_admin = admin_pb2_grpc.AdminStub(other)
                assert await refusal(other_admin.GrantCredits(grant, metadata=ADMIN)) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"too many failed attempts, retry after {WINDOW} s",
                    str(WINDOW),
                )
            clock.advance(WINDOW - 1)
            assert await refusal(admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=ADMIN)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "too many failed attempts, retry after 1 s",
                "1",
            )

            # The window has passed: the right token works again, and a wrong one starts a fresh budget.
            clock.advance(1)
            await admin.GrantCredits(grant, metadata=ADMIN)
            code, details, _ = await refusal(admin.GrantCredits(grant, metadata=guess(999)))
            assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown admin token")

            # Only the two grants sent with the right token while not blocked reached the ledger.
            account = await admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=ADMIN)
            assert account.balance.credits == 200
            ledger = await admin.ListLedger(admin_pb2.ListLedgerRequest(user_id=uid), metadata=ADMIN)
            assert sorted((e.kind, e.amount) for e in ledger.entries) == [("grant", 100), ("grant", 100)]
            audit = await admin.ListAuditLog(
                admin_pb2.ListAuditLogRequest(target=uid, action="credits.grant"), metadata=ADMIN
            )
            assert len(audit.entries) == 2

            # Every refusal is counted: 4 + 1 + 1 wrong tokens compared, 39 + 1 + 1 calls refused uncompared.
            assert await auth_failures(http, running) == {"unknown_token": 6.0, "blocked": 41.0}
    finally:
        await running.stop()


async def test_a_balance_link_forged_with_the_public_default_secret_is_refused_by_an_up_deployment(
    database_url: str, redis_url: str, redis_prefix: str, uid: str, tmp_path: Path
) -> None:
    # Settings as `quotagate up` makes them: the demo config, deploy-time values from the environment.
    state = tmp_path / "state"
    state.mkdir()
    loaded = load_settings(demo_config_path(state), deploy_env(database_url, redis_url))
    assert loaded.link_secret == DEFAULT_LINK_SECRET  # what `up` used to run with
    # (The tests share one database, which keeps the first definition of a plan id: the harness's plan, not the
    # demo's, so this test seeds nothing another test could trip on.)
    settings = dataclasses.replace(
        with_own_link_secret(loaded, state),
        redis_prefix=redis_prefix,
        plans=(Plan(id="small", monthly_allowance=1000),),
        default_plan="small",
    )
    running = await start(settings)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", timeout=10) as http,
        ):
            admin = admin_pb2_grpc.AdminStub(channel)
            reason = "Red team: an account with a balance worth hiding."
            await admin.UpsertAccount(admin_pb2.UpsertAccountRequest(user_id=uid, reason=reason), metadata=ADMIN)
            await admin.GrantCredits(
                admin_pb2.GrantCreditsRequest(user_id=uid, amount=4321, reason=reason), metadata=ADMIN
            )
            now = datetime.now(UTC)
            forged = LinkSigner(DEFAULT_LINK_SECRET.encode(), settings.public_url).token(uid, now)
            for fmt in ("json", "html"):
                response = await http.get(BALANCE_PATH, params={"t": forged, "format": fmt})
                assert response.status_code == 401, response.text
                assert uid not in response.text and "4321" not in response.text and "4,321" not in response.text

            # The link the deployment itself signs does open the page: the refusal above is the secret's doing.
            genuine = LinkSigner(settings.link_secret.encode(), settings.public_url).token(uid, now)
            response = await http.get(BALANCE_PATH, params={"t": genuine, "format": "json"})
            assert response.status_code == 200, response.text
            assert (response.json()["user_id"], response.json()["credits"]) == (uid, 4321)
        # Nothing the forged link did touched the account.
        account, balance = await running.service.account(uid)
        assert (account.user_id, balance.credits, balance.allowance_used) == (uid, 4321, 0)
    finally:
        await running.stop()


async def test_missing_tokens_and_too_low_roles_spend_no_budget(
    database_url: str, redis_url: str, redis_prefix: str, uid: str
) -> None:
    viewer = "red-team-viewer-token"
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin={"failed_auth": {"max_failures": 2, "window_seconds": WINDOW}},
        admin_tokens=[{"name": "viewer-bot", "token_sha256": sha256_hex(viewer), "role": "viewer"}],
    )
    running = await start(settings, clock=FixedClock(NOW))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            reason = "Red team: a viewer trying to grant."
            await admin.UpsertAccount(admin_pb2.UpsertAccountRequest(user_id=uid, reason=reason), metadata=ADMIN)
            grant = admin_pb2.GrantCreditsRequest(user_id=uid, amount=7, reason=reason)
            for _ in range(5):
                code, details, _ = await refusal(admin.GrantCredits(grant))
                assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("missing admin token")
                low = [("authorization", f"Bearer {viewer}")]
                assert (await refusal(admin.GrantCredits(grant, metadata=low)))[0] == grpc.StatusCode.PERMISSION_DENIED
            await admin.GrantCredits(grant, metadata=ADMIN)  # not blocked: nothing above was a guess
            account = await admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=ADMIN)
            assert account.balance.credits == 7
    finally:
        await running.stop()
