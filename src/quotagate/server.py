"""The composition root: settings in, stores and servers up, and down again in order."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from ssl import CERT_REQUIRED, SSLContext

import grpc
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from quotagate.adapters.admin import AdminService
from quotagate.adapters.ext_authz import AuthorizationService
from quotagate.adapters.ext_proc import ExternalProcessorService
from quotagate.adapters.ratelimit import RateLimitService
from quotagate.adapters.usage import UsageService
from quotagate.adapters.wire import add_guarded
from quotagate.billing.setup import create_billing
from quotagate.billing.web import add_billing_routes
from quotagate.config import Settings
from quotagate.core.clock import Clock, SystemClock
from quotagate.envoyconf import RATELIMIT_DOMAIN, tokens_descriptor
from quotagate.http import build_http_app
from quotagate.keywatch import ClientKeyVersion, watch_client_keys
from quotagate.metrics import Metrics
from quotagate.notify import NotificationSender, WebhookSender
from quotagate.outbox import UsageOutbox
from quotagate.ratelimit.limiter import Entry, RateLimiter, RequestDescriptor
from quotagate.ratelimit.reload import ReloadingConfig
from quotagate.ratelimit.store import RedisRateLimitStore
from quotagate.service import QuotaService
from quotagate.stopping import stop_if_cancelled
from quotagate.store.notices import PostgresNoticeBook
from quotagate.store.postgres import PostgresLedger
from quotagate.store.redis import RedisHotState
from quotagate.store.resp import PipelinedRedis
from quotagate.unary import UnaryServer
from quotagate.unary.limits import DecisionLimits, DecisionTls
from quotagate.unary.tls import server_context
from quotagate.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from quotagate.web.quota import add_quota_routes
from quotagate.workers import WorkerRole

log = logging.getLogger("quotagate.server")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["Usage"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
SWEEP_INTERVAL_SECONDS = 5.0
MAX_MESSAGE_BYTES = 8 << 20
DEFAULT_RATE_LIMITS = Path(str(resources.files("quotagate").joinpath("templates", "ratelimit.yaml")))


def split_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class Running:
    """A started quotagate: what tests and `up` need to reach and stop it."""

    service: QuotaService
    grpc_port: int
    http_port: int
    stop: Callable[[], Awaitable[None]]
    admin_port: int = 0  # the Admin service's port: grpc_port unless admin.listen gives it one of its own
    decision_port: int = 0  # the unary server's port (what Envoy calls); 0 when decision_listen is off


async def start(
    settings: Settings, clock: Clock | None = None, migrate: bool = True, role: WorkerRole | None = None
) -> Running:
    role = role or WorkerRole()
    # Before anything opens: certificate files that do not load stop the start with nothing to clean up.
    decision_ssl = decision_ssl_context(settings.decision_tls)
    metrics = Metrics()
    metrics.worker_info.labels(str(role.index), str(os.getpid())).set(1)
    service_box: list[QuotaService] = []
    notifying = settings.notifications.enabled
    ledger = await PostgresLedger.connect(
        settings.database_url,
        lambda a: service_box[0].limits_of(a),
        notifications=notifying,
        mail=settings.notifications.mail,
        webhook=settings.notifications.webhook,
    )
    hot = RedisHotState.from_url(settings.redis_url, settings.redis_prefix)
    outbox = UsageOutbox(hot.client, settings.redis_prefix)
    service = QuotaService(settings, ledger, hot, clock or SystemClock(), metrics, outbox)
    service_box.append(service)
    if migrate:
        applied = await ledger.migrate()
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
    seeded = await ledger.sync_plans(settings.plans)
    if seeded:
        log.info("plans seeded from the config: %s", ", ".join(seeded))
    await service.refresh_plans()
    await service.refresh_client_keys()

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # The decision port's stream limit here too: a peer's streams past it are refused, not queued.
            ("grpc.max_concurrent_streams", settings.decision_limits.max_concurrent_streams),
        ]
    )
    # Requests that do not parse (invalid UTF-8, truncated) get INVALID_ARGUMENT, not grpcio's UNKNOWN.
    authorization = AuthorizationService(service)
    add_guarded(server, external_auth_pb2_grpc.add_AuthorizationServicer_to_server, authorization)
    rate_limits = ReloadingConfig(
        settings.rate_limit_files or (DEFAULT_RATE_LIMITS,), on_error=lambda _: metrics.ratelimit_config_errors.inc()
    )
    rate_limit_redis = PipelinedRedis(settings.redis_url)
    key_version = ClientKeyVersion(rate_limit_redis, settings.redis_prefix)
    service.on_client_keys_changed = key_version.bump
    limiter = RateLimiter(
        rate_limits.current,
        RedisRateLimitStore(rate_limit_redis, f"{settings.redis_prefix}rl:"),
        service.clock,
        settings.timezone,
    )
    rate_limit_service = RateLimitService(limiter, settings, metrics)

    async def count_tokens(user_id: str, tokens: int) -> None:
        entries = tuple(Entry(key, value) for key, value in tokens_descriptor(user_id))
        await limiter.should_rate_limit(RATELIMIT_DOMAIN, [RequestDescriptor(entries)], tokens)

    ext_proc = ExternalProcessorService(service, PostgresNoticeBook(ledger.pool), count_tokens)
    add_guarded(server, external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server, ext_proc)
    add_guarded(server, rls_pb2_grpc.add_RateLimitServiceServicer_to_server, rate_limit_service)
    add_guarded(server, usage_pb2_grpc.add_UsageServicer_to_server, UsageService(service))
    separate_admin = bool(settings.admin.listen)
    billing = create_billing(service, ledger)
    admin_service = AdminService(service, billing)
    if not separate_admin:
        add_guarded(server, admin_pb2_grpc.add_AdminServicer_to_server, admin_service)
    served = tuple(n for n in SERVICE_NAMES if not (separate_admin and n == ADMIN_SERVICE_NAME))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*served, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    grpc_port = server.add_insecure_port(settings.grpc_listen)
    if grpc_port == 0:
        raise OSError(f"cannot listen for gRPC on {settings.grpc_listen}")
    await server.start()
    admin_server, admin_port = None, grpc_port
    if separate_admin:
        admin_server, admin_port = await _start_admin_server(settings, admin_service, health_servicer)
    decisions, decision_port = None, 0
    if settings.decision_listen:
        decisions, decision_port = await _start_decision_server(
            settings.decision_listen, authorization, rate_limit_service, ext_proc, health_servicer,
            limits=settings.decision_limits, observer=DecisionMetrics(metrics), ssl=decision_ssl,
        )  # fmt: skip
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    http_app = build_http_app(
        metrics,
        {"postgres": ledger.ping, "redis": hot.ping},
        [functools.partial(add_quota_routes, service=service), functools.partial(add_billing_routes, billing=billing)],
    )
    runner = web.AppRunner(http_app, access_log=None)
    await runner.setup()
    http_host, http_port = split_listen(settings.http_listen)
    site = web.TCPSite(runner, http_host, http_port, reuse_port=True)
    await site.start()
    http_port = runner.addresses[0][1] if runner.addresses else http_port

    # Per process: the rate-limit config, the client keys and the users this process failed to update.
    # Once per deployment (worker 0): charging expired reservations and sending e-mails.
    tasks = [
        asyncio.create_task(_sweep(service, expire=role.runs_singletons), name="reservation-sweeper"),
        asyncio.create_task(rate_limits.watch(), name="rate-limit-config-watcher"),
        asyncio.create_task(watch_client_keys(service, key_version), name="client-key-watcher"),
    ]
    if settings.notifications.mail and role.runs_singletons:
        tasks.append(asyncio.create_task(NotificationSender(ledger, settings).run(), name="notification-sender"))
    if settings.notifications.webhook and role.runs_singletons:
        tasks.append(asyncio.create_task(WebhookSender(ledger, settings).run(), name="webhook-sender"))

    async def stop() -> None:
        # Health turns NOT_SERVING first so balancers stop sending, then in-flight calls get time to finish.
        await health_servicer.enter_graceful_shutdown()
        for task in tasks:
            task.cancel()
        # Bounded: a background loop that swallowed its cancellation must not hold up the shutdown.
        _, stuck = await asyncio.wait(tasks, timeout=5)
        for task in stuck:
            log.warning("background task %s did not stop when asked", task.get_name())
        if admin_server is not None:
            await admin_server.stop(grace=5)
        await asyncio.gather(server.stop(grace=5), *([decisions.stop(grace=5)] if decisions else []))
        await ext_proc.drain()
        await runner.cleanup()
        await billing.close()
        rate_limit_redis.close()
        await hot.close()
        await ledger.close()

    log.info(
        "quotagate serving gRPC on %s (port %d), Envoy's calls also on port %d, HTTP on port %d",
        settings.grpc_listen,
        grpc_port,
        decision_port,
        http_port,
        extra={"worker": role.index, "pid": os.getpid()},
    )
    return Running(
        service=service,
        grpc_port=grpc_port,
        http_port=http_port,
        stop=stop,
        admin_port=admin_port,
        decision_port=decision_port,
    )


class DecisionMetrics:
    """The unary server's limits.Observer, counted in Metrics (the unary package knows nothing of prometheus)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def limit_hit(self, limit: str) -> None:
        self._metrics.decision_limit_hits.labels(limit).inc()

    def closed_for_cause(self, cause: str) -> None:
        self._metrics.decision_connections_closed.labels(cause).inc()

    def connections(self, open_connections: int) -> None:
        self._metrics.decision_connections.set(open_connections)


def decision_ssl_context(tls: DecisionTls | None) -> SSLContext | None:
    """The decision port's SSLContext from `decision.tls`; None for plaintext."""
    if tls is None:
        return None
    try:
        return server_context(tls)
    except OSError as exc:  # ssl.SSLError included: a key not the certificate's, a file that is not PEM
        raise OSError(f"cannot use decision.tls ({tls.cert}, {tls.key}, {tls.client_ca}): {exc}") from exc


async def _start_decision_server(
    listen: str,
    authorization: AuthorizationService,
    rate_limits: RateLimitService,
    ext_proc: ExternalProcessorService,
    health_servicer: health.aio.HealthServicer,
    limits: DecisionLimits | None = None,
    observer: DecisionMetrics | None = None,
    ssl: SSLContext | None = None,
) -> tuple[UnaryServer, int]:
    """Check, ShouldRateLimit, ext_proc's streams and health's Check on the unary server: what Envoy asks on
    every request."""
    decisions = UnaryServer(limits=limits or DecisionLimits(), observer=observer)
    decisions.add_servicer(external_auth_pb2_grpc.add_AuthorizationServicer_to_server, authorization)
    decisions.add_servicer(rls_pb2_grpc.add_RateLimitServiceServicer_to_server, rate_limits)
    decisions.add_servicer(external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server, ext_proc)
    decisions.add_servicer(health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
    host, port = split_listen(listen)
    try:
        port_taken = await decisions.start(host, port, ssl=ssl)
        if ssl is not None:
            log.info("quotagate serving Envoy's calls on %s (port %d) over %s", listen, port_taken,
                     "mutual TLS" if ssl.verify_mode == CERT_REQUIRED else "TLS")  # fmt: skip
        return decisions, port_taken
    except OSError as exc:
        raise OSError(f"cannot listen for Envoy's calls (decision_listen) on {listen}: {exc}") from exc


async def _start_admin_server(
    settings: Settings, admin: AdminService, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """The Admin service (with health and reflection) on its own port; mutual TLS when admin.tls is given."""
    listener = settings.admin
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if listener.tls_cert and listener.tls_key and listener.tls_client_ca:
        credentials = grpc.ssl_server_credentials(
            [(listener.tls_key.read_bytes(), listener.tls_cert.read_bytes())],
            root_certificates=listener.tls_client_ca.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port(listener.listen, credentials)
    else:
        port = server.add_insecure_port(listener.listen)
    if port == 0:
        raise OSError(f"cannot listen for the Admin API on {listener.listen}")
    await server.start()
    log.info("quotagate serving the Admin API on %s (port %d, %s)", listener.listen, port,
             "mutual TLS" if listener.tls else "plaintext")  # fmt: skip
    return server, port


async def _sweep(service: QuotaService, expire: bool = True) -> None:
    async def expire_reservations() -> None:
        await service.refresh_stale()
        if expire:
            await service.expire_due()

    steps: list[tuple[Callable[[], Awaitable[object]], str]] = [
        # Usage kept while PostgreSQL was away goes first, so expiries below see it settled.
        (service.drain_outbox, "writing the usage outbox to the ledger failed"),
        (expire_reservations, "expiring reservations failed"),
        # The fallback when the client key version in Redis cannot be read (keywatch.py).
        (service.refresh_client_keys, "refreshing client keys failed"),
        # So do plan changes, with the hot state of the accounts on a changed plan.
        (service.refresh_plans, "refreshing plans failed"),
    ]
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
        for step, failure in steps:
            try:
                await step()
            except Exception as exc:  # the sweeper must outlive a store hiccup; it retries next round
                stop_if_cancelled(exc)
                log.exception(failure)
            stop_if_cancelled()


async def serve_forever(settings: Settings, migrate: bool = True, role: WorkerRole | None = None) -> None:
    running = await start(settings, migrate=migrate, role=role)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info("stopping")
    await running.stop()
