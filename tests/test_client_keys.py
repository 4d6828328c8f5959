"""Client keys created through the Admin API: used by Check through Envoy, revoked with 401, secrets never
stored or shown again, role admin only, and the `quotagate admin keys` commands."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from harness import ADMIN_TOKEN, Stack, make_settings

from quotagate import keywatch, server
from quotagate.config import Settings, sha256_hex
from quotagate.server import Running
from quotagate.v1 import admin_pb2

OPERATOR_TOKEN = "test-operator-token-keys"
VIEWER_TOKEN = "test-viewer-token-keys"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
OPERATOR = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
VIEWER = [("authorization", f"Bearer {VIEWER_TOKEN}")]


def settings_for(database_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return make_settings(
        database_url,
        redis_url,
        redis_prefix,
        admin_tokens=[
            {"name": "operator-bot", "token_sha256": sha256_hex(OPERATOR_TOKEN), "role": "operator"},
            {"name": "viewer-bot", "token_sha256": sha256_hex(VIEWER_TOKEN), "role": "viewer"},
        ],
    )


async def create(stack: Stack, name: str, **fields: Any) -> admin_pb2.CreateClientKeyResponse:
    return await stack.admin.CreateClientKey(admin_pb2.CreateClientKeyRequest(name=name, **fields), metadata=ADMIN)


async def test_created_key_works_through_envoy_and_revoked_key_gets_401(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        trusted = await create(stack, f"{uid}-chat", trusted=True, reason="New chat front end.")
        assert trusted.secret.startswith("qg_") and len(trusted.secret) >= 40
        assert trusted.key.name == f"{uid}-chat" and trusted.key.trusted and trusted.key.created_by == "env"
        assert not trusted.key.HasField("revoked_at")

        response = await stack.chat(uid, key=trusted.secret)
        assert response.status_code == 200, response.text
        assert response.headers["x-quota-state"] == "normal"

        personal = await create(stack, f"{uid}-personal", user_id=f"{uid}-me")
        assert not personal.key.trusted and personal.key.user_id == f"{uid}-me"
        response = await stack.chat(None, key=personal.secret)
        assert response.status_code == 200
        assert (await stack.account(f"{uid}-me")).user_id == f"{uid}-me"
        response = await stack.chat("someone-else", key=personal.secret)
        assert response.status_code == 401

        # A key that merely looks like one is refused.
        response = await stack.chat(uid, key=trusted.secret + "x")
        assert response.status_code == 401

        revoked = await stack.admin.RevokeClientKey(
            admin_pb2.RevokeClientKeyRequest(name=f"{uid}-chat", reason="Front end retired."), metadata=ADMIN
        )
        assert revoked.HasField("revoked_at")
        response = await stack.chat(uid, key=trusted.secret)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        # The configured keys still work next to the database ones.
        assert (await stack.chat(uid)).status_code == 200
        assert (await stack.chat(None, key=personal.secret)).status_code == 200


async def test_keys_changed_by_another_process_are_seen_after_the_refresh(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "SWEEP_INTERVAL_SECONDS", 3600.0)  # only the explicit refresh below
    monkeypatch.setattr(keywatch, "POLL_SECONDS", 3600.0)
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        created = await create(stack, f"{uid}-other", trusted=True)
        assert (await stack.chat(uid, key=created.secret)).status_code == 200
        # Another process revokes the key: this one refuses it after its next refresh (the sweeper's round).
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE client_keys SET revoked_at = now() WHERE name = $1", f"{uid}-other")
            secret = "qg_made-elsewhere-" + uid
            await conn.execute(
                "INSERT INTO client_keys (name, key_sha256, trusted) VALUES ($1, $2, true)",
                f"{uid}-elsewhere",
                sha256_hex(secret),
            )
        finally:
            await conn.close()
        assert stack.quotagate is not None
        assert (await stack.chat(uid, key=secret)).status_code == 401  # not known yet: no database call in Check
        await stack.quotagate.service.refresh_client_keys()
        assert (await stack.chat(uid, key=created.secret)).status_code == 401
        assert (await stack.chat(uid, key=secret)).status_code == 200


async def test_the_sweeper_refreshes_the_keys_periodically(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "SWEEP_INTERVAL_SECONDS", 0.2)
    monkeypatch.setattr(keywatch, "POLL_SECONDS", 3600.0)  # the change below bypasses quotagate: no version bump
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        created = await create(stack, f"{uid}-swept", trusted=True)
        assert (await stack.chat(uid, key=created.secret)).status_code == 200
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE client_keys SET revoked_at = now() WHERE name = $1", f"{uid}-swept")
        finally:
            await conn.close()
        statuses = []
        for _ in range(50):
            statuses.append((await stack.chat(uid, key=created.secret)).status_code)
            if statuses[-1] == 401:
                break
            await asyncio.sleep(0.1)
        assert statuses[-1] == 401, statuses


async def test_secret_is_never_listed_nor_audited_and_changes_are_audited(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        name = f"{uid}-audited"
        created = await create(stack, name, user_id=uid, reason="Personal key for a script.")
        await stack.admin.RevokeClientKey(
            admin_pb2.RevokeClientKeyRequest(name=name, reason="Leaked in a screenshot."), metadata=ADMIN
        )
        digest = sha256_hex(created.secret)

        listing = await stack.admin.ListClientKeys(admin_pb2.ListClientKeysRequest(), metadata=ADMIN)
        mine = [k for k in listing.keys if k.name == name]
        assert len(mine) == 1 and mine[0].HasField("revoked_at") and mine[0].user_id == uid
        assert created.secret not in str(listing) and digest not in str(listing)
        active = await stack.admin.ListClientKeys(admin_pb2.ListClientKeysRequest(active_only=True), metadata=ADMIN)
        assert name not in [k.name for k in active.keys]

        audit = await stack.admin.ListAuditLog(admin_pb2.ListAuditLogRequest(target=name), metadata=VIEWER)
        assert [(e.action, e.actor, e.reason) for e in audit.entries] == [
            ("client_key.revoke", "env", "Leaked in a screenshot."),
            ("client_key.create", "env", "Personal key for a script."),
        ]
        revoke, create_entry = audit.entries
        assert json.loads(create_entry.after_json)["user_id"] == uid and create_entry.before_json == ""
        assert json.loads(revoke.before_json)["revoked_at"] is None
        assert json.loads(revoke.after_json)["revoked_at"] is not None
        assert created.secret not in str(audit) and digest not in str(audit)

        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT * FROM client_keys WHERE name = $1", name)
            audit_text = await conn.fetchval("SELECT string_agg(row_to_json(a)::text, ' ') FROM audit_log a")
        finally:
            await conn.close()
        assert row is not None and row["key_sha256"] == digest
        assert created.secret not in str(dict(row))
        assert created.secret not in audit_text


async def test_roles_names_and_reasons(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        for metadata in (OPERATOR, VIEWER):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.admin.CreateClientKey(
                    admin_pb2.CreateClientKeyRequest(name=f"{uid}-x", trusted=True), metadata=metadata
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.admin.ListClientKeys(admin_pb2.ListClientKeysRequest(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await create(stack, f"{uid}-k", trusted=True)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.admin.RevokeClientKey(
                admin_pb2.RevokeClientKeyRequest(name=f"{uid}-k", reason="Not allowed to."), metadata=OPERATOR
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        bad: list[tuple[dict[str, Any], grpc.StatusCode]] = [
            ({"name": f"{uid}-k", "trusted": True}, grpc.StatusCode.INVALID_ARGUMENT),  # name taken
            ({"name": f"{uid}-n"}, grpc.StatusCode.INVALID_ARGUMENT),  # untrusted without a user
            ({"name": f"{uid}-n", "trusted": True, "user_id": "u"}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"name": "", "trusted": True}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"name": "chat", "trusted": True}, grpc.StatusCode.INVALID_ARGUMENT),  # a configured client's name
        ]
        for fields, code in bad:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(stack, **fields)
            assert caught.value.code() == code, fields
        for name, reason, code in [
            (f"{uid}-k", "", grpc.StatusCode.INVALID_ARGUMENT),
            (f"{uid}-nothing", "No such key exists here.", grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.admin.RevokeClientKey(
                    admin_pb2.RevokeClientKeyRequest(name=name, reason=reason), metadata=ADMIN
                )
            assert caught.value.code() == code
        await stack.admin.RevokeClientKey(
            admin_pb2.RevokeClientKeyRequest(name=f"{uid}-k", reason="The script is done with it."), metadata=ADMIN
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.admin.RevokeClientKey(
                admin_pb2.RevokeClientKeyRequest(name=f"{uid}-k", reason="Revoked twice by mistake."), metadata=ADMIN
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def cli(running: Running, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "QUOTAGATE_ADMIN_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate.cli", "admin", "--server", f"127.0.0.1:{running.grpc_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_keys_create_list_revoke(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, uid: str
) -> None:
    async with Stack(settings_for(database_url, redis_url, redis_prefix), tmp_path) as stack:
        assert stack.quotagate is not None
        running = stack.quotagate
        code, out, err = await cli(running, "keys", "create", f"{uid}-cli", "--trusted", "--reason", "For the CLI.")
        assert code == 0, err
        secret = next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))
        assert secret.startswith("qg_") and f"key        {uid}-cli created" in out
        assert (await stack.chat(uid, key=secret)).status_code == 200

        code, out, err = await cli(running, "--json", "keys", "create", f"{uid}-cli2", "--user", uid)
        assert code == 0, err
        second = json.loads(out)
        assert second["secret"].startswith("qg_") and second["key"]["user_id"] == uid

        code, out, _ = await cli(running, "keys", "create", f"{uid}-cli3")
        assert code == 2 and out == ""  # --trusted or --user is required

        code, out, _ = await cli(running, "keys", "list")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == ["name", "trusted", "user", "created", "by", "revoked"]
        mine = {r.split()[0]: r.split() for r in rows if r.startswith(uid)}
        assert mine[f"{uid}-cli"][1:3] == ["yes", "-"] and mine[f"{uid}-cli"][-1] == "-"
        assert mine[f"{uid}-cli2"][1:3] == ["no", uid]
        assert secret not in out and second["secret"] not in out

        code, out, err = await cli(running, "keys", "revoke", f"{uid}-cli", "--reason", "Rotated after six months.")
        assert code == 0, err
        assert "revoked    " in out and "revoked    -" not in out
        assert (await stack.chat(uid, key=secret)).status_code == 401

        code, out, _ = await cli(running, "--json", "keys", "list", "--active")
        names = [k["name"] for k in json.loads(out).get("keys", [])]
        assert code == 0 and f"{uid}-cli2" in names and f"{uid}-cli" not in names

        code, _, err = await cli(running, "keys", "list", token=OPERATOR_TOKEN)
        assert code == 4 and "permission_denied" in err
