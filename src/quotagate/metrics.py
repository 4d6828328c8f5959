"""Prometheus metrics, created once per process (listed in the README)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "quotagate_decisions_total",
            "Check decisions by quota state (normal, warn, critical, blocked, suspended, unauthenticated, "
            "invalid, error).",
            ["state"],
            registry=self.registry,
        )
        self.check_seconds = Histogram(
            "quotagate_check_duration_seconds",
            "Time to answer one Check.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.usage_reports = Counter(
            "quotagate_usage_reports_total",
            "Usage settlements by outcome (charged, duplicate, failed, invalid).",
            ["outcome"],
            registry=self.registry,
        )
        self.tokens_charged = Counter(
            "quotagate_tokens_charged_total", "Weighted tokens charged to accounts.", registry=self.registry
        )
        self.reservations_expired = Counter(
            "quotagate_reservations_expired_total",
            "Reservations never settled and charged at their estimate.",
            registry=self.registry,
        )
        self.reservations_released = Counter(
            "quotagate_reservations_released_total",
            "Reservations never settled whose request never reached the upstream, released without a charge.",
            registry=self.registry,
        )
        self.ratelimit_hits = Counter(
            "quotagate_ratelimit_hits_total", "Rate-limit checks per configured limit.", ["key"], registry=self.registry
        )
        self.ratelimit_over = Counter(
            "quotagate_ratelimit_over_limit_total", "Checks over the limit.", ["key"], registry=self.registry
        )
        self.ratelimit_near = Counter(
            "quotagate_ratelimit_near_limit_total", "Checks above 80% of the limit.", ["key"], registry=self.registry
        )
        self.ratelimit_within = Counter(
            "quotagate_ratelimit_within_limit_total", "Checks within the limit.", ["key"], registry=self.registry
        )
        self.ratelimit_shadow = Counter(
            "quotagate_ratelimit_shadow_mode_total",
            "Checks over a shadow-mode limit (reported, not denied).",
            ["key"],
            registry=self.registry,
        )
        self.ratelimit_config_errors = Counter(
            "quotagate_ratelimit_config_errors_total",
            "Rate-limit config reloads refused because the edited files were invalid.",
            registry=self.registry,
        )
        self.store_errors = Counter(
            "quotagate_store_errors_total",
            "Decisions taken without the store, by the on_store_error policy applied (deny, allow).",
            ["policy"],
            registry=self.registry,
        )
        self.unauthenticated_calls = Counter(
            "quotagate_unauthenticated_calls_total",
            "gRPC calls refused for a missing or wrong caller token, by service (authorization, ratelimit, "
            "ext_proc, usage).",
            ["service"],
            registry=self.registry,
        )
        self.outbox_records = Gauge(
            "quotagate_usage_outbox_records",
            "Settled usage waiting in the Redis outbox for PostgreSQL (as of this process's last drain).",
            registry=self.registry,
        )
        self.admin_auth_failures = Counter(
            "quotagate_admin_auth_failures_total",
            "Admin calls refused by their token: unknown_token (a wrong token, counted against the peer's budget) "
            "or blocked (a peer past admin.failed_auth.max_failures, refused without comparing its token).",
            ["reason"],
            registry=self.registry,
        )
        self.decision_limit_hits = Counter(
            "quotagate_decision_limit_hits_total",
            "Decision-port limits reached, by limit (max_connections, max_concurrent_streams, "
            "max_header_list_bytes, max_message_bytes, max_buffered_in_bytes, max_buffered_out_bytes, "
            "header_read_timeout).",
            ["limit"],
            registry=self.registry,
        )
        self.decision_connections_closed = Counter(
            "quotagate_decision_connections_closed_total",
            "Decision-port connections closed by quotagate for a cause: a limit, a timeout (idle_timeout, "
            "header_read_timeout, write_stalled), a flood (ping_flood, settings_flood, empty_frames, rapid_reset, "
            "header_bomb), a protocol error (its RFC 9113 code in lower case) or tls_handshake (decision.tls).",
            ["cause"],
            registry=self.registry,
        )
        self.decision_connections = Gauge(
            "quotagate_decision_connections",
            "Open connections to this process's decision port.",
            registry=self.registry,
        )
        self.worker_info = Gauge(
            "quotagate_worker_info",
            "1, labelled with this serving process's worker index and pid (one series per process: with "
            "--workers N each scrape reaches one of the N).",
            ["worker", "pid"],
            registry=self.registry,
        )
