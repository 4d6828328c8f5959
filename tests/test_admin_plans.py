"""Plans managed through the Admin API, against the real server (PostgreSQL, Redis, Envoy): a change applies to
the next decision, in this process and in others; the database is the record once a plan is there."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import ADMIN_TOKEN, Stack, make_settings
from test_service_ports import grpcurl

from quotagate.config import sha256_hex
from quotagate.server import Running, start
from quotagate.store.ports import NewAccount
from quotagate.v1 import admin_pb2, admin_pb2_grpc

VIEWER_TOKEN = "plans-viewer-token"
OPERATOR_TOKEN = "plans-operator-token"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
VIEWER = [("authorization", f"Bearer {VIEWER_TOKEN}")]
OPERATOR = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
WHY = "Pricing of the second semester."


def settings(database_url: str, redis_url: str, redis_prefix: str, **overrides: Any) -> Any:
    return make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin_tokens=[
            {"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"},
            {"name": "operator-bot", "token_sha256": sha256_hex(OPERATOR_TOKEN), "role": "operator"},
        ],
        **overrides,
    )


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    code: grpc.StatusCode = caught.value.code()
    return code


async def test_update_plan_and_move_to_a_new_plan_apply_to_the_next_request_through_envoy(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings(database_url, redis_url, redis_prefix), tmp_path) as stack:
        plan_id = f"team-{uid}"
        created = await stack.admin.CreatePlan(
            admin_pb2.CreatePlanRequest(id=plan_id, name="Team", monthly_allowance=100, reason=WHY), metadata=ADMIN
        )
        assert (created.id, created.monthly_allowance, created.active, created.accounts) == (plan_id, 100, True, 0)
        assert (created.warn_threshold, created.critical_threshold) == (0.80, 0.95)
        await stack.admin.UpsertAccount(
            admin_pb2.UpsertAccountRequest(user_id=uid, plan=plan_id, reason="Joined the team plan today."),
            metadata=ADMIN,
        )
        await stack.report(uid, f"{uid}-r1", 100)  # the whole allowance
        blocked = await stack.chat(uid)
        assert blocked.status_code == 429  # the hot state in Redis now holds the allowance of 100

        updated = await stack.admin.UpdatePlan(
            admin_pb2.UpdatePlanRequest(id=plan_id, monthly_allowance=1000, reason=WHY), metadata=ADMIN
        )
        assert (updated.monthly_allowance, updated.name, updated.accounts) == (1000, "Team", 1)
        allowed = await stack.chat(uid)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["x-quota-limit"] == "1000"
        assert allowed.headers["x-quota-state"] == "normal"

        # Lower thresholds change the state of the next answer too.
        await stack.admin.UpdatePlan(
            admin_pb2.UpdatePlanRequest(id=plan_id, warn_threshold=0.05, critical_threshold=0.5, reason=WHY),
            metadata=ADMIN,
        )
        warned = await stack.chat(uid)
        assert warned.status_code == 200 and warned.headers["x-quota-state"] == "warn"

        # A user blocked on the default plan is moved to a bigger one: the next request is allowed.
        other = f"{uid}-other"
        await stack.report(other, f"{other}-r1", 1000)
        assert (await stack.chat(other)).status_code == 429
        bigger = f"bigger-{uid}"
        await stack.admin.CreatePlan(
            admin_pb2.CreatePlanRequest(id=bigger, monthly_allowance=5000, reason=WHY), metadata=ADMIN
        )
        moved = await stack.admin.UpsertAccount(
            admin_pb2.UpsertAccountRequest(user_id=other, plan=bigger, reason="Upgraded after a call today."),
            metadata=ADMIN,
        )
        assert moved.plan == bigger and moved.balance.allowance == 5000
        after_move = await stack.chat(other)
        assert after_move.status_code == 200 and after_move.headers["x-quota-limit"] == "5000"


async def test_plans_listed_validated_audited_and_guarded_by_roles(
    database_url: str, redis_url: str, redis_prefix: str, uid: str
) -> None:
    running = await start(settings(database_url, redis_url, redis_prefix))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            plan_id = f"pro-{uid}"
            weight = admin_pb2.ModelWeight(pattern="heavy-*", input=2.0, output=3.0)
            request = admin_pb2.CreatePlanRequest(
                id=plan_id, name="Pro", monthly_allowance=50_000, model_weights=[weight], reason=WHY
            )
            assert await code_of(admin.CreatePlan(request, metadata=OPERATOR)) == grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(admin.CreatePlan(request, metadata=[])) == grpc.StatusCode.UNAUTHENTICATED
            await admin.CreatePlan(request, metadata=ADMIN)
            assert await code_of(admin.CreatePlan(request, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT

            bad = [
                admin_pb2.CreatePlanRequest(id="has space", monthly_allowance=1, reason=WHY),
                admin_pb2.CreatePlanRequest(id=f"{uid}-a", monthly_allowance=-1, reason=WHY),
                admin_pb2.CreatePlanRequest(id=f"{uid}-b", monthly_allowance=1, warn_threshold=1.5, reason=WHY),
                admin_pb2.CreatePlanRequest(
                    id=f"{uid}-c", monthly_allowance=1, warn_threshold=0.9, critical_threshold=0.5, reason=WHY
                ),
                admin_pb2.CreatePlanRequest(id=f"{uid}-d", monthly_allowance=1, reason="Too short."),
            ]
            for item in bad:
                assert await code_of(admin.CreatePlan(item, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT, item
            missing = admin_pb2.UpdatePlanRequest(id=f"nothing-{uid}", monthly_allowance=5, reason=WHY)
            assert await code_of(admin.UpdatePlan(missing, metadata=ADMIN)) == grpc.StatusCode.NOT_FOUND
            inverted = admin_pb2.UpdatePlanRequest(id=plan_id, warn_threshold=0.99, reason=WHY)
            assert await code_of(admin.UpdatePlan(inverted, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT
            nothing = admin_pb2.UpdatePlanRequest(id=plan_id, reason=WHY)
            assert await code_of(admin.UpdatePlan(nothing, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT

            listed = await admin.ListPlans(admin_pb2.ListPlansRequest(), metadata=VIEWER)
            ids = [p.id for p in listed.plans]
            assert ids == sorted(ids) and "small" in ids and plan_id in ids
            got = await admin.GetPlan(admin_pb2.GetPlanRequest(id=plan_id), metadata=VIEWER)
            assert (got.name, got.monthly_allowance, [w.pattern for w in got.model_weights]) == (
                "Pro",
                50_000,
                ["heavy-*"],
            )
            unknown = admin.GetPlan(admin_pb2.GetPlanRequest(id=f"nothing-{uid}"), metadata=VIEWER)
            assert await code_of(unknown) == grpc.StatusCode.NOT_FOUND

            # The plan's weights price its accounts' usage; replacing them changes the next charge.
            await admin.UpsertAccount(
                admin_pb2.UpsertAccountRequest(user_id=uid, plan=plan_id, reason="Moved to the pro plan."),
                metadata=ADMIN,
            )
            first, _ = await running.service.report_usage(_usage(f"{uid}-1", uid, "heavy-1", 10, 10))
            assert first.cost == 10 * 2 + 10 * 3
            await admin.UpdatePlan(
                admin_pb2.UpdatePlanRequest(id=plan_id, replace_model_weights=True, reason=WHY), metadata=ADMIN
            )
            second, _ = await running.service.report_usage(_usage(f"{uid}-2", uid, "heavy-1", 10, 10))
            assert second.cost == 20

            # An inactive plan keeps its accounts and takes no new ones; the default plan stays active.
            await admin.UpdatePlan(admin_pb2.UpdatePlanRequest(id=plan_id, active=False, reason=WHY), metadata=ADMIN)
            active = await admin.ListPlans(admin_pb2.ListPlansRequest(active_only=True), metadata=VIEWER)
            assert plan_id not in [p.id for p in active.plans]
            join = admin_pb2.UpsertAccountRequest(user_id=f"{uid}-new", plan=plan_id, reason="Wants the pro plan.")
            assert await code_of(admin.UpsertAccount(join, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT
            assert (await admin.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=VIEWER)).plan == plan_id
            off = admin_pb2.UpdatePlanRequest(id="small", active=False, reason=WHY)
            assert await code_of(admin.UpdatePlan(off, metadata=ADMIN)) == grpc.StatusCode.INVALID_ARGUMENT

            audit = await admin.ListAuditLog(admin_pb2.ListAuditLogRequest(target=f"plan:{plan_id}"), metadata=VIEWER)
            assert [(e.action, e.actor, e.reason) for e in reversed(audit.entries)] == [
                ("plan.create", "env", WHY),
                ("plan.update", "env", WHY),
                ("plan.update", "env", WHY),
            ]
            newest = audit.entries[0]
            assert (json.loads(newest.before_json)["active"], json.loads(newest.after_json)["active"]) == (True, False)
            weights_change = audit.entries[1]
            assert json.loads(weights_change.before_json)["model_weights"] == [
                {"pattern": "heavy-*", "input": 2.0, "output": 3.0}
            ]
            assert json.loads(weights_change.after_json)["model_weights"] == []
    finally:
        await running.stop()


def _usage(request_id: str, user: str, model: str, prompt: int, completion: int) -> Any:
    from quotagate.service import UsageReport

    return UsageReport(request_id, user, model, prompt, completion)


async def test_the_database_is_the_record_and_other_processes_follow_a_change(
    database_url: str, redis_url: str, redis_prefix: str, uid: str
) -> None:
    plan_id = f"seeded-{uid}"
    config_plans = [{"id": "small", "monthly_allowance": 1000}, {"id": plan_id, "monthly_allowance": 300}]
    first = await start(settings(database_url, redis_url, redis_prefix, plans=config_plans))
    # A second process with another config that defines the same plan differently: the database keeps the first.
    changed_config = [{"id": "small", "monthly_allowance": 1000}, {"id": plan_id, "monthly_allowance": 999}]
    second = await start(settings(database_url, redis_url, redis_prefix, plans=changed_config))
    try:
        assert second.service.plan(plan_id).monthly_allowance == 300
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as one,
            grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as two,
        ):
            admin_one, admin_two = admin_pb2_grpc.AdminStub(one), admin_pb2_grpc.AdminStub(two)
            await admin_one.UpsertAccount(
                admin_pb2.UpsertAccountRequest(user_id=uid, plan=plan_id, reason="Seeded plan for the test."),
                metadata=ADMIN,
            )
            await second.service.report_usage(_usage(f"{uid}-1", uid, "demo-small", 300, 0))
            account = await admin_two.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=ADMIN)
            assert (account.balance.allowance, account.balance.state) == (300, "blocked")

            await admin_one.UpdatePlan(
                admin_pb2.UpdatePlanRequest(id=plan_id, monthly_allowance=600, reason=WHY), metadata=ADMIN
            )
            # The second process learns of it on its next periodic reload (called here instead of waiting).
            assert await second.service.refresh_plans() == [plan_id]
            assert await second.service.refresh_plans() == []
            account = await admin_two.GetAccount(admin_pb2.GetAccountRequest(user_id=uid), metadata=ADMIN)
            assert (account.balance.allowance, account.balance.state) == (600, "normal")
            hot = await second.service.hot.view(uid, account.balance.cycle, second.service.clock.now().timestamp())
            assert hot is not None and hot.limits.allowance == 600

            # A plan created by the first process is usable through the second before its periodic reload:
            # Check, usage with the plan's weights, and the admin calls.
            fresh = f"fresh-{uid}"
            weight = admin_pb2.ModelWeight(pattern="heavy-*", input=3.0, output=3.0)
            await admin_one.CreatePlan(
                admin_pb2.CreatePlanRequest(id=fresh, monthly_allowance=50, model_weights=[weight], reason=WHY),
                metadata=ADMIN,
            )
            newcomer = f"{uid}-new"
            await admin_one.UpsertAccount(
                admin_pb2.UpsertAccountRequest(user_id=newcomer, plan=fresh, reason="Joined the fresh plan today."),
                metadata=ADMIN,
            )
            with pytest.raises(KeyError):
                second.service.plan(fresh)  # not reloaded yet
            # No hot state either, so Check reads the ledger, which meets the plan the second process lacks.
            await second.service.hot.forget(newcomer, second.service.cycle(second.service.clock.now()).key)
            decision = await second.service.check(NewAccount(newcomer), f"{newcomer}-1", None)
            assert decision.allowed and decision.balance.allowance == 50
            outcome, balance = await second.service.report_usage(_usage(f"{newcomer}-2", newcomer, "heavy-1", 5, 5))
            assert outcome.cost == 30 and balance.allowance_used == 30
            listed = await admin_two.ListAccounts(admin_pb2.ListAccountsRequest(plan=fresh), metadata=ADMIN)
            assert [(a.user_id, a.balance.allowance) for a in listed.accounts] == [(newcomer, 50)]
    finally:
        await second.stop()
        await first.stop()
    # A restart with the old config does not undo the change.
    third = await start(settings(database_url, redis_url, redis_prefix, plans=config_plans))
    try:
        assert third.service.plan(plan_id).monthly_allowance == 600
    finally:
        await third.stop()


@pytest.fixture
async def server(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Running]:
    running = await start(settings(database_url, redis_url, redis_prefix))
    yield running
    await running.stop()


async def cli(running: Running, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "QUOTAGATE_ADMIN_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "admin", "--server", f"127.0.0.1:{running.grpc_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_plans_list_create_update(server: Running, uid: str) -> None:
    plan_id = f"cli-{uid}"
    code, out, err = await cli(
        server, "plans", "create", plan_id, "--allowance", "20000", "--name", "CLI plan", "--warn", "0.7",
        "--weight", "big-*=2,4", "--reason", WHY,
    )  # fmt: skip
    assert code == 0, err
    assert f"plan       {plan_id}  CLI plan" in out and "20,000 tokens a month" in out
    assert "thresholds warn 70%, critical 95%" in out and "weights    big-* in 2 out 4" in out

    code, out, err = await cli(server, "--json", "plans", "update", plan_id, "--allowance", "30000", "--reason", WHY)
    assert code == 0, err
    assert json.loads(out)["monthly_allowance"] == "30000" and json.loads(out)["warn_threshold"] == 0.7

    code, out, _ = await cli(server, "plans", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["id", "name", "allowance", "warn"]
    assert any(row.split()[0] == plan_id and "30,000" in row for row in rows)

    code, out, _ = await cli(server, "--json", "plans", "list", "--active")
    assert code == 0 and plan_id in [p["id"] for p in json.loads(out)["plans"]]

    code, _, err = await cli(server, "plans", "update", plan_id, "--inactive", "--reason", WHY)
    assert code == 0, err
    code, out, _ = await cli(server, "--json", "plans", "list", "--active")
    assert plan_id not in [p["id"] for p in json.loads(out)["plans"]]

    code, out, err = await cli(server, "plans", "update", f"nothing-{uid}", "--allowance", "1", "--reason", WHY)
    assert (code, out) == (5, "") and err.startswith("quotagate admin: not_found:") and err.count("\n") == 1
    code, _, err = await cli(server, "plans", "create", plan_id, "--allowance", "1", "--reason", "Short.")
    assert code == 2 and "at least 3 words" in err
    code, _, err = await cli(server, "plans", "create", f"{plan_id}-x", "--allowance", "1", "--reason", WHY,
                             token=VIEWER_TOKEN)  # fmt: skip
    assert code == 4 and "permission_denied" in err
    code, _, err = await cli(
        server, "plans", "create", f"{plan_id}-y", "--allowance", "1", "--weight", "oops", "--reason", WHY
    )
    assert code == 2 and "--weight" in err


async def test_grpcurl_plan_lines_of_the_readme(server: Running, uid: str) -> None:
    address, auth = f"127.0.0.1:{server.grpc_port}", f"authorization: Bearer {ADMIN_TOKEN}"
    plan_id = f"curl-{uid}"
    create = {
        "id": plan_id, "name": "Pro", "monthly_allowance": 5000000,
        "model_weights": [{"pattern": "gpt-4o*", "input": 2.5, "output": 10}],
        "reason": "New plan for the second semester.",
    }  # fmt: skip
    code, out, err = await grpcurl("-plaintext", "-H", auth, "-d", json.dumps(create), address,
                                   "quotagate.v1.Admin/CreatePlan")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["model_weights"] == [{"pattern": "gpt-4o*", "input": 2.5, "output": 10}]
    update = {"id": plan_id, "monthly_allowance": 6000000, "reason": "Price review of November."}
    code, out, err = await grpcurl("-plaintext", "-H", auth, "-d", json.dumps(update), address,
                                   "quotagate.v1.Admin/UpdatePlan")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["monthly_allowance"] == "6000000"
    move = {"user_id": uid, "plan": plan_id, "reason": "Upgraded by e-mail today."}
    code, out, err = await grpcurl("-plaintext", "-H", auth, "-d", json.dumps(move), address,
                                   "quotagate.v1.Admin/UpsertAccount")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["balance"]["allowance"] == "6000000"
    code, out, err = await grpcurl("-plaintext", "-H", auth, address, "quotagate.v1.Admin/ListPlans")
    assert code == 0, err
    plans = {p["id"]: p for p in json.loads(out)["plans"]}
    assert plans[plan_id]["accounts"] == "1" and plans[plan_id]["active"] is True
