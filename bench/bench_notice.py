"""What the notice in the conversation costs: the time of the one completion that carries it, against a warned
user's completion after it was shown and a normal user's completion, through Envoy with ext_authz + ext_proc.

    scripts/dev python bench/bench_notice.py [--users 40]

Starts, each in its own process: quotagate (python -m quotagate.cli serve, plan of 1,000 tokens), the demo
upstream and Envoy (the shipped config, ext_proc on). Each of --users users is first brought to warn (82%) by one
completion; then, one request at a time on a keep-alive connection, per user: the completion that carries the
warn notice (the claim is a PostgreSQL INSERT), then one after it (no notice: the claim is known in process).
Fresh users below warn give the baseline. Each phase runs once as JSON and once streamed (time to the whole
body). Every answer is checked: the notice is in exactly the first completion of each warned user.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from typing import Any

import common
import httpx
import yaml
from bench_envoy import start_envoy_target, start_upstream

from quotagate.envoyconf import EnvoyOptions, build_envoy_config
from quotagate.procs import ManagedProcess, free_port, wait_for_port

NOTICE_MARK = "⚠️"


async def start_quotagate(bench: common.Bench, stores: common.Stores) -> tuple[ManagedProcess, int, int, str]:
    key = "bench-" + secrets.token_hex(16)
    config = {
        "timezone": "America/Sao_Paulo",
        "language": "en",
        "default_plan": "small",
        "credits_email": "creditos@example.com",
        "estimate": {"minimum": 10, "default_completion_tokens": 50},
        "plans": [{"id": "small", "monthly_allowance": 1000}],
        "clients": [{"name": "bench", "key": key, "trusted": True}],
        "redis_prefix": stores.redis_prefix,
        "reservation_ttl_seconds": 3600,
    }
    path = bench.tmp / "quotagate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "QUOTAGATE_DATABASE_URL": stores.database_url,
        "QUOTAGATE_REDIS_URL": stores.redis_url,
        "QUOTAGATE_GRPC_LISTEN": f"{common.HOST}:{grpc_port}",
        "QUOTAGATE_HTTP_LISTEN": f"{common.HOST}:{http_port}",
        "QUOTAGATE_DECISION_LISTEN": "",  # Check on the grpc.aio port: what is measured here is the notice
        "QUOTAGATE_ADMIN_TOKEN": secrets.token_hex(16),
        **common.caller_token_env(),  # the Envoy below sends common.ENVOY_TOKEN
    }
    env.pop("QUOTAGATE_CONFIG", None)
    env.pop("QUOTAGATE_ENV", None)
    argv = [sys.executable, "-m", "quotagate.cli", "serve", "--config", str(path), "--log-level", "WARNING"]
    proc = bench.manage(ManagedProcess(argv, bench.tmp / "quotagate.log", env=env, name="quotagate").start())
    await wait_for_port(common.HOST, grpc_port, timeout=60, process=proc)
    await common.wait_ready(http_port, proc)
    return proc, grpc_port, http_port, key


def body(tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "demo-small",
        "max_tokens": 900 if tokens > 50 else 10,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}],
    }


async def completion(http: httpx.AsyncClient, key: str, user: str, tokens: int, stream: bool) -> tuple[float, str]:
    headers = {"authorization": f"Bearer {key}", "x-user-id": user, "x-demo-completion-tokens": str(tokens)}
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body(tokens, stream), headers=headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{user}: HTTP {response.status_code}: {response.text[:200]}")
    return elapsed, response.text


def row(name: str, times: list[float]) -> list[object]:
    ordered = sorted(times)
    p50, p90 = (common.percentile(ordered, p) * 1000 for p in (50, 90))
    return [name, len(ordered), f"{p50:.2f}", f"{p90:.2f}"]


async def main_async(args: argparse.Namespace) -> int:
    async with common.Bench("bench-notice", keep_tmp=args.keep_tmp) as bench:
        stores = await common.start_stores(bench, args.database_url, args.redis_url)
        _, grpc_port, http_port, key = await start_quotagate(bench, stores)
        _, upstream_port = await start_upstream(bench)
        options = EnvoyOptions(
            upstream_host=common.HOST,
            upstream_port=upstream_port,
            listen_port=free_port(),
            admin_port=free_port(),
            authz_port=grpc_port,
            http_port=http_port,
            ext_proc=True,
            envoy_token=common.ENVOY_TOKEN,
        )
        _, envoy_port = await start_envoy_target(bench, "notice", build_envoy_config(options), None)
        print(f"bench_notice: {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
        print(f"  {stores.database_note}\n  {stores.redis_note}")
        print(f"  {args.users} users per phase, one request at a time, HTTP/1.1 keep-alive through Envoy\n")
        rows: list[list[object]] = []
        async with httpx.AsyncClient(base_url=f"http://{common.HOST}:{envoy_port}", timeout=30) as http:
            for stream in (False, True):
                kind = "stream" if stream else "JSON"
                run = secrets.token_hex(3)
                warned = [f"warned-{run}-{i}" for i in range(args.users)]
                normal = [f"normal-{run}-{i}" for i in range(args.users)]
                for user in warned:
                    await completion(http, key, user, 820, False)
                for user in normal:
                    await completion(http, key, user, 5, False)
                carrying, after, below = [], [], []
                for user in warned:
                    elapsed, text = await completion(http, key, user, 5, stream)
                    if NOTICE_MARK not in text and "\\u26a0" not in text:
                        raise RuntimeError(f"{user}: no notice in {text[:300]}")
                    carrying.append(elapsed)
                for user in warned:
                    elapsed, text = await completion(http, key, user, 5, stream)
                    if NOTICE_MARK in text or "\\u26a0" in text:
                        raise RuntimeError(f"{user}: a second notice")
                    after.append(elapsed)
                for user in normal:
                    below.append((await completion(http, key, user, 5, stream))[0])
                rows += [
                    row(f"{kind}: normal user", below),
                    row(f"{kind}: warned, notice already shown", after),
                    row(f"{kind}: the completion carrying the notice", carrying),
                ]
        common.print_table(["completion", "n", "p50 ms", "p90 ms"], rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.set_defaults(users=40)
    args = parser.parse_args()
    return common.run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
