"""The `quotagate` command: up, serve, migrate, reconcile, check-config, admin."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from quotagate.admin_cli import add_admin_parser, run_admin
from quotagate.config import ConfigError, Settings, load_settings
from quotagate.ratelimit.config import RateLimitConfigError, load_ratelimit_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quotagate", description="Monthly token quotas for LLM traffic.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack locally: PostgreSQL, Redis, Envoy, quotagate, demo LLM")
    up.add_argument("--config", type=Path, help="quotagate YAML config (default: the demo config)")
    up.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    up.add_argument("--redis-url", help="use this Redis instead of an embedded one")
    upstream = up.add_mutually_exclusive_group()
    upstream.add_argument("--upstream", help="OpenAI-compatible upstream URL (default: a demo upstream)")
    upstream.add_argument(
        "--litellm",
        action="store_true",
        help="run a real LiteLLM proxy (mock models, quotagate's usage callback) as the upstream; "
        "needs quotagate[litellm]",
    )
    up.add_argument("--port", type=int, default=10000, help="Envoy listener port (default 10000)")
    up.add_argument("--state-dir", type=Path, default=Path(".quotagate"), help="where embedded data and logs go")

    serve = sub.add_parser("serve", help="run the quotagate service alone (production)")
    serve.add_argument("--config", type=Path, help="YAML config (default: $QUOTAGATE_CONFIG)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations at start")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes sharing the gRPC and HTTP ports (SO_REUSEPORT), supervised by this one (default 1)",
    )
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor

    migrate = sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    migrate.add_argument("--config", type=Path)

    reconcile = sub.add_parser(
        "reconcile", help="compare Redis's balances with the PostgreSQL ledger; exits 1 on drift unless --repair"
    )
    reconcile.add_argument("--config", type=Path)
    reconcile.add_argument("--json", action="store_true", help="the report as JSON")
    reconcile.add_argument("--repair", action="store_true", help="rewrite drifting balances from the ledger")

    add_admin_parser(sub)

    check = sub.add_parser("check-config", help="validate a config or rate-limit file; exits 1 naming the file and key")
    check.add_argument("file", type=Path)
    return parser


def _check_config(path: Path) -> int:
    """Validates a quotagate config (and the rate-limit files it names), or a rate-limit file on its own."""
    if _is_rate_limit_file(path):
        config = load_ratelimit_config([path])
        print(f"{path}: ok (rate limits for domain {', '.join(config.domains)})")
        return 0
    settings = load_settings(path, os.environ)
    rate_limits = load_ratelimit_config(settings.rate_limit_files) if settings.rate_limit_files else None
    domains = f", rate limits for {', '.join(rate_limits.domains)}" if rate_limits else ""
    print(f"{path}: ok ({len(settings.plans)} plans, {len(settings.clients)} clients{domains})")
    return 0


def _is_rate_limit_file(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load_settings reports it with the file name
    return isinstance(data, dict) and "domain" in data


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from quotagate.logs import setup_logging

    setup_logging(args.log_level)
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.workers > 1 and args.worker_index is None:
        from quotagate.server import split_listen
        from quotagate.workers import Supervisor

        listeners = [("grpc_listen", settings.grpc_listen), ("http_listen", settings.http_listen)]
        if settings.decision_listen:
            listeners.append(("decision_listen", settings.decision_listen))
        for name, listen in listeners:
            if split_listen(listen)[1] == 0:
                raise ConfigError(f"{name}: --workers needs a fixed port, not 0 (each worker would get its own)")
        command = [sys.executable, "-m", "quotagate.cli", "serve", "--log-level", args.log_level]
        command += ["--workers", str(args.workers)]
        if args.config is not None:
            command += ["--config", str(args.config)]
        if args.no_migrate:
            command.append("--no-migrate")  # else every worker migrates; an advisory lock makes that safe
        return asyncio.run(Supervisor(command, args.workers).run())

    from quotagate.server import serve_forever
    from quotagate.workers import WorkerRole

    role = WorkerRole(args.worker_index or 0, args.workers)
    asyncio.run(serve_forever(settings, migrate=not args.no_migrate, role=role))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "admin":
            return run_admin(args)
        if args.command == "up":
            from quotagate.up import UpOptions, run_up

            return asyncio.run(
                run_up(
                    UpOptions(
                        config=args.config,
                        database_url=args.database_url,
                        redis_url=args.redis_url,
                        upstream=args.upstream,
                        port=args.port,
                        state_dir=args.state_dir,
                        litellm=args.litellm,
                    )
                )
            )
        settings = load_settings(args.config, os.environ)
        if args.command == "serve":
            return _serve(args, settings)
        if args.command == "reconcile":
            from quotagate.reconcile import run_reconcile

            return asyncio.run(run_reconcile(settings, as_json=args.json, repair=args.repair))
        if args.command == "migrate":
            from quotagate.store.postgres import PostgresLedger

            async def run_migrations() -> list[str]:
                ledger = await PostgresLedger.connect(settings.database_url, lambda a: NotImplemented, max_size=1)
                try:
                    return await ledger.migrate()
                finally:
                    await ledger.close()

            applied = asyncio.run(run_migrations())
            print("applied: " + ", ".join(applied) if applied else "nothing to apply")
            return 0
    except (ConfigError, RateLimitConfigError) as exc:
        print(f"quotagate: config error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
