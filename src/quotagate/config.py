"""Settings: one YAML file (QUOTAGATE_CONFIG) plus QUOTAGATE_* environment variables for deploy-time values.

Every key is declared here once with its default. Unknown keys and bad values raise ConfigError naming the
file and the key, so `quotagate check-config` and a starting server say exactly what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from quotagate.core.estimate import EstimateSettings
from quotagate.core.messages import Language
from quotagate.core.model import AdmissionMode, ModelWeight, Plan
from quotagate.unary.limits import DecisionLimits, DecisionTls

DEFAULT_LINK_SECRET = "quotagate-development-link-secret"  # refused in production, like the admin token
DEFAULT_ADMIN_TOKEN = "change-me"  # accepted only outside production, so a demo works out of the box
# What Envoy sends on its gRPC calls, and what a usage reporter (the LiteLLM callback) sends with ReportUsage;
# the public defaults are refused in production, like the admin token.
DEFAULT_ENVOY_TOKEN = "quotagate-development-envoy-token"
DEFAULT_USAGE_TOKEN = "quotagate-development-usage-token"
MIN_PRODUCTION_TOKEN_CHARS = 16


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Client:
    """A caller of Check, known by the SHA-256 of its bearer key."""

    name: str
    key_sha256: str
    trusted: bool  # may assert the user with x-user-id
    user_id: str | None = None  # the user an untrusted key acts for


@dataclass(frozen=True)
class AdminToken:
    name: str
    token_sha256: str
    role: str = "admin"


@dataclass(frozen=True)
class AdminListener:
    """An optional listener of its own for quotagate.v1.Admin (with health and reflection). When `listen` is set,
    the Admin service is served only there, not on grpc_listen; with TLS files it requires a client certificate
    signed by client_ca (mutual TLS), and the admin token is still required on every call."""

    listen: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class FailedAuthLimit:
    """`admin.failed_auth`: a peer (an IP) that sends `max_failures` wrong admin tokens within `window_seconds`
    is refused, token unchecked, for one window. Counted per serving process."""

    max_failures: int = 10
    window_seconds: float = 60.0


@dataclass(frozen=True)
class NotificationSettings:
    """Customer notifications, off unless `notifications.enabled`: e-mails by SMTP (with an smtp_host) and/or a
    signed HTTP webhook (with webhook.url), each delivered from the same outbox and tracked on its own."""

    enabled: bool = False
    smtp_host: str = ""
    smtp_port: int = 25
    sender: str = ""  # the `from` key
    poll_seconds: float = 5.0  # how often the senders look for due notifications
    retry_seconds: float = 30.0  # the first retry's delay; it doubles up to max_retry_seconds
    max_retry_seconds: float = 3600.0
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)  # signs each POST (HMAC-SHA256); never logged
    webhook_timeout_seconds: float = 10.0

    @property
    def mail(self) -> bool:
        return self.enabled and bool(self.smtp_host)

    @property
    def webhook(self) -> bool:
        return self.enabled and bool(self.webhook_url)


@dataclass(frozen=True)
class NoticeSettings:
    """What the chat user is told inside the conversation (headers are always sent)."""

    # The first completion after crossing warn (and again critical) in a cycle carries a short notice.
    in_conversation: bool = True


@dataclass(frozen=True)
class StripeSettings:
    """Phase 2: credits bought by card through Stripe Checkout. Off by default; the manual path stays."""

    enabled: bool = False
    # Secrets: from QUOTAGATE_STRIPE_SECRET_KEY / QUOTAGATE_STRIPE_WEBHOOK_SECRET (the YAML keys are for tests).
    secret_key: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)
    # Where Stripe sends the buyer back after paying or giving up; empty: quotagate's own small pages.
    success_url: str = ""
    cancel_url: str = ""
    # Stripe's API; tests point it at a local stand-in.
    api_base: str = "https://api.stripe.com"
    # How old a webhook's signed timestamp may be (replay protection).
    tolerance_seconds: int = 300


@dataclass(frozen=True)
class Package:
    """A package of credit tokens sold through Stripe Checkout."""

    id: str
    tokens: int
    price: int  # in the currency's smallest unit (centavos for BRL)
    currency: str = "brl"
    active: bool = True
    name: str = ""  # shown on the purchase page and in Checkout; default: "<tokens> tokens"


@dataclass(frozen=True)
class Settings:
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    language: Language = Language.EN
    admission_mode: AdmissionMode = AdmissionMode.DEFAULT
    default_plan: str = "basic"
    plans: tuple[Plan, ...] = (Plan(id="basic", monthly_allowance=1_000_000),)
    model_weights: tuple[ModelWeight, ...] = ()
    estimate: EstimateSettings = field(default_factory=EstimateSettings)
    reservation_ttl_seconds: int = 600
    on_store_error: str = "deny"
    # How usage reaches quotagate: "ext_proc" (Envoy's ext_proc sees every forwarded request, as in the shipped
    # Envoy config) or "callback" (only a usage report, e.g. LiteLLM's callback). With ext_proc, a hold whose
    # request never left Envoy is released when it expires; with callback quotagate cannot tell, and charges it.
    usage_capture: str = "ext_proc"
    credits_email: str = ""
    purchase_url: str = ""
    # Where people reach Envoy from a browser; personal links (balance, purchase) start with it.
    public_url: str = "http://127.0.0.1:10000"
    # Signs the personal links; production refuses the default.
    link_secret: str = DEFAULT_LINK_SECRET
    # Bearer tokens: Envoy's on Check, ShouldRateLimit and ext_proc; a usage reporter's on ReportUsage.
    envoy_token: str = field(default=DEFAULT_ENVOY_TOKEN, repr=False)
    usage_token: str = field(default=DEFAULT_USAGE_TOKEN, repr=False)
    clients: tuple[Client, ...] = ()
    # Secrets (and URLs that may carry passwords) are left out of repr, so printing settings leaks nothing.
    upstream_api_key: str = field(default="", repr=False)
    admin_tokens: tuple[AdminToken, ...] = ()
    database_url: str = field(default="postgresql://127.0.0.1:5432/quotagate", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_prefix: str = "qg:"
    grpc_listen: str = "127.0.0.1:50051"
    # What Envoy calls (Check, ShouldRateLimit, ext_proc) on a lean HTTP/2 server (quotagate.unary); "" is off.
    decision_listen: str = "127.0.0.1:50053"
    # `decision:` what the decision port takes from a peer (connections, streams, bytes, timeouts).
    decision_limits: DecisionLimits = field(default_factory=DecisionLimits)
    # `decision.tls`: TLS (and with client_ca mutual TLS) on the decision port; None: plaintext.
    decision_tls: DecisionTls | None = None
    http_listen: str = "127.0.0.1:8080"
    production: bool = False
    # envoyproxy/ratelimit-format files (or folders); empty: the built-in default (60 requests a minute a user).
    rate_limit_files: tuple[Path, ...] = ()
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    stripe: StripeSettings = field(default_factory=StripeSettings)
    admin: AdminListener = field(default_factory=AdminListener)
    admin_failed_auth: FailedAuthLimit = field(default_factory=FailedAuthLimit)
    packages: tuple[Package, ...] = ()
    notices: NoticeSettings = field(default_factory=NoticeSettings)
    source: str = "<defaults>"

    def plan(self, plan_id: str) -> Plan:
        for plan in self.plans:
            if plan.id == plan_id:
                return plan
        raise KeyError(plan_id)

    def client_by_key(self, key: str) -> Client | None:
        digest = sha256_hex(key)
        for client in self.clients:
            if client.key_sha256 == digest:
                return client
        return None

    @property
    def purchase_hint(self) -> str:
        """Where a user gets more tokens: the purchase page, else the credits address."""
        if self.purchase_url:
            return self.purchase_url
        if self.credits_email:
            return f"mailto:{self.credits_email}"
        return ""


def _is_sha256_hex(digest: str) -> bool:
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


T = TypeVar("T")


class _Section:
    """A mapping read key by key; whatever is left unread at the end is an unknown key."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping")
        self.source, self.path, self.data = source, path, dict(data)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)}: {problem}")

    def take(self, name: str, kind: type[T], default: T) -> T:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(name, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    def take_choice(self, name: str, parse: Callable[[str], T], default: T, choices: str) -> T:
        if name not in self.data:
            return default
        raw = self.take(name, str, "")
        try:
            return parse(raw)
        except (ValueError, KeyError, ZoneInfoNotFoundError, OSError):
            raise self.fail(name, f"{raw!r} is not one of {choices}") from None

    def items(self, name: str) -> list[_Section]:
        raw = self.data.pop(name, [])
        if not isinstance(raw, list):
            raise self.fail(name, "expected a list")
        return [_Section(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(raw)]

    def sub(self, name: str) -> _Section:
        return _Section(self.source, self.key(name), self.data.pop(name, {}) or {})

    def done(self) -> None:
        for name in self.data:
            raise self.fail(str(name), "unknown key")


def _positive_int(section: _Section, name: str, default: int, minimum: int = 0) -> int:
    value = section.take(name, int, default)
    if value < minimum:
        raise section.fail(name, f"must be at least {minimum}")
    return value


def _fraction(section: _Section, name: str, default: float) -> float:
    value = section.take(name, float, default)
    if not 0.0 < value <= 1.0:
        raise section.fail(name, "must be a fraction in (0, 1]")
    return value


def _weights(section: _Section, name: str) -> tuple[ModelWeight, ...]:
    weights = []
    for item in section.items(name):
        pattern = item.take("pattern", str, "")
        if not pattern:
            raise item.fail("pattern", "required")
        w = ModelWeight(pattern, item.take("input", float, 1.0), item.take("output", float, 1.0))
        for side in ("input", "output"):
            if getattr(w, side) < 0:
                raise item.fail(side, "weights must not be negative")
        item.done()
        weights.append(w)
    return tuple(weights)


def _plan(item: _Section) -> Plan:
    plan_id = item.take("id", str, "")
    if not plan_id:
        raise item.fail("id", "required")
    plan = Plan(
        id=plan_id,
        monthly_allowance=_positive_int(item, "monthly_allowance", 1_000_000),
        warn_threshold=_fraction(item, "warn_threshold", 0.80),
        critical_threshold=_fraction(item, "critical_threshold", 0.95),
        weights=_weights(item, "model_weights"),
        name=item.take("name", str, ""),
    )
    if plan.warn_threshold > plan.critical_threshold:
        raise item.fail("warn_threshold", "must not be above critical_threshold")
    item.done()
    return plan


def _client(item: _Section) -> Client:
    name = item.take("name", str, "")
    digest = item.take("key_sha256", str, "").lower()
    plain = item.take("key", str, "")
    if plain and digest:
        raise item.fail("key", "give key or key_sha256, not both")
    if plain:
        digest = sha256_hex(plain)
    if not _is_sha256_hex(digest):
        raise item.fail("key_sha256", "required: the SHA-256 hex digest of the client key")
    trusted = item.take("trusted", bool, False)
    user_id = item.take("user_id", str, "") or None
    if not trusted and not user_id:
        raise item.fail("user_id", "an untrusted client needs the user_id it acts for")
    item.done()
    return Client(name=name or digest[:8], key_sha256=digest, trusted=trusted, user_id=user_id)


def _admin_token(item: _Section) -> AdminToken:
    name = item.take("name", str, "")
    if not name:
        raise item.fail("name", "required")
    digest = item.take("token_sha256", str, "").lower()
    if not _is_sha256_hex(digest):
        raise item.fail("token_sha256", "required: the SHA-256 hex digest of the token")
    role = item.take("role", str, "admin")
    if role not in ("viewer", "operator", "admin"):
        raise item.fail("role", "must be viewer, operator or admin")
    item.done()
    return AdminToken(name, digest, role)


MIN_WEBHOOK_SECRET_CHARS = 16


def _notifications(section: _Section, env: Mapping[str, str]) -> NotificationSettings:
    defaults = NotificationSettings()
    hook = section.sub("webhook")
    url = hook.take("url", str, "")
    secret = env.get("QUOTAGATE_WEBHOOK_SECRET", hook.take("secret", str, ""))
    timeout = hook.take("timeout_seconds", float, defaults.webhook_timeout_seconds)
    if url and not url.startswith(("http://", "https://")):
        raise hook.fail("url", "must be an http:// or https:// URL")
    if url and len(secret) < MIN_WEBHOOK_SECRET_CHARS:
        raise hook.fail(
            "secret",
            f"required with a url: at least {MIN_WEBHOOK_SECRET_CHARS} characters (or QUOTAGATE_WEBHOOK_SECRET)",
        )
    if timeout <= 0:
        raise hook.fail("timeout_seconds", "must be positive")
    hook.done()
    result = NotificationSettings(
        enabled=section.take("enabled", bool, False),
        smtp_host=section.take("smtp_host", str, ""),
        smtp_port=_positive_int(section, "smtp_port", defaults.smtp_port, 1),
        sender=section.take("from", str, ""),
        poll_seconds=section.take("poll_seconds", float, defaults.poll_seconds),
        retry_seconds=section.take("retry_seconds", float, defaults.retry_seconds),
        max_retry_seconds=section.take("max_retry_seconds", float, defaults.max_retry_seconds),
        webhook_url=url,
        webhook_secret=secret,
        webhook_timeout_seconds=timeout,
    )
    for name in ("poll_seconds", "retry_seconds", "max_retry_seconds"):
        if getattr(result, name) <= 0:
            raise section.fail(name, "must be positive")
    if result.smtp_port > 65535:
        raise section.fail("smtp_port", "must be a TCP port")
    if result.enabled and not result.smtp_host and not result.webhook_url:
        raise section.fail("smtp_host", "required when notifications are enabled (or give webhook.url)")
    if result.enabled and result.smtp_host and not result.sender:
        raise section.fail("from", "required when notifications are enabled")
    section.done()
    return result


def _stripe(section: _Section, env: Mapping[str, str]) -> StripeSettings:
    defaults = StripeSettings()
    result = StripeSettings(
        enabled=section.take("enabled", bool, False),
        secret_key=env.get("QUOTAGATE_STRIPE_SECRET_KEY", section.take("secret_key", str, "")),
        webhook_secret=env.get("QUOTAGATE_STRIPE_WEBHOOK_SECRET", section.take("webhook_secret", str, "")),
        success_url=section.take("success_url", str, ""),
        cancel_url=section.take("cancel_url", str, ""),
        api_base=section.take("api_base", str, defaults.api_base).rstrip("/"),
        tolerance_seconds=_positive_int(section, "tolerance_seconds", defaults.tolerance_seconds, 1),
    )
    for name in ("success_url", "cancel_url", "api_base"):
        value = getattr(result, name)
        if value and not value.startswith(("https://", "http://")):
            raise section.fail(name, "must be an http(s) URL")
    section.done()
    return result


def _decision_listen(top: _Section, env: Mapping[str, str], default: str) -> str:
    """host:port for the unary server, or "" (off); checked here, since the server binds it with asyncio."""
    listen, where = top.take("decision_listen", str, default), top.key("decision_listen")
    if "QUOTAGATE_DECISION_LISTEN" in env:
        listen, where = env["QUOTAGATE_DECISION_LISTEN"], "QUOTAGATE_DECISION_LISTEN"
    host, colon, port = listen.strip().rpartition(":")
    if listen.strip() and not (colon and host and port.isdigit() and int(port) < 65536):
        raise ConfigError(f"{top.source}: {where}: {listen!r} is not host:port (or empty to turn it off)")
    return listen.strip()


def _decision_limits(section: _Section) -> DecisionLimits:
    """`decision:` limits; the caller reads `decision.tls` and calls done()."""
    d = DecisionLimits()
    limits = DecisionLimits(
        max_connections=_positive_int(section, "max_connections", d.max_connections, 1),
        max_concurrent_streams=_positive_int(section, "max_concurrent_streams", d.max_concurrent_streams, 1),
        max_header_list_bytes=_positive_int(section, "max_header_list_bytes", d.max_header_list_bytes, 1024),
        max_message_bytes=_positive_int(section, "max_message_bytes", d.max_message_bytes, 1024),
        max_buffered_in_bytes=_positive_int(section, "max_buffered_in_bytes", d.max_buffered_in_bytes, 16384),
        max_buffered_out_bytes=_positive_int(section, "max_buffered_out_bytes", d.max_buffered_out_bytes, 16384),
        idle_timeout_seconds=section.take("idle_timeout_seconds", float, d.idle_timeout_seconds),
        header_read_timeout_seconds=section.take("header_read_timeout_seconds", float, d.header_read_timeout_seconds),
    )
    for name in ("idle_timeout_seconds", "header_read_timeout_seconds"):
        if getattr(limits, name) <= 0:
            raise section.fail(name, "must be positive")
    return limits


def _tls_file(tls: _Section, name: str, base: Path) -> Path | None:
    """A PEM file named in a `tls:` section, relative to the config file; None when not given."""
    raw = tls.take(name, str, "")
    path = None if not raw else (Path(raw) if Path(raw).is_absolute() else base / raw)
    if path is not None and not path.is_file():
        raise tls.fail(name, f"no such file: {path}")
    return path


def _decision_tls(tls: _Section, base: Path) -> DecisionTls | None:
    """`decision.tls`: cert and key for TLS; with client_ca also mutual TLS. None (plaintext) when empty."""
    cert, key, client_ca = (_tls_file(tls, name, base) for name in ("cert", "key", "client_ca"))
    tls.done()
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise tls.fail("key" if key is None else "cert", "required: TLS needs both cert and key")
    return DecisionTls(cert, key, client_ca)


def _admin_listener(section: _Section, env: Mapping[str, str], base: Path) -> AdminListener:
    listen = env.get("QUOTAGATE_ADMIN_LISTEN", section.take("listen", str, ""))
    tls = section.sub("tls")
    files: dict[str, Path | None] = {}
    for name in ("cert", "key", "client_ca"):
        files[name] = _tls_file(tls, name, base)
    tls.done()
    given = [name for name, path in files.items() if path is not None]
    if given and len(given) < 3:
        missing = next(name for name, path in files.items() if path is None)
        raise tls.fail(missing, "required: mutual TLS needs cert, key and client_ca")
    if given and not listen:
        raise section.fail("listen", "required with admin.tls: the address of the admin port")
    section.done()
    return AdminListener(listen, files["cert"], files["key"], files["client_ca"])


def _failed_auth(section: _Section) -> FailedAuthLimit:
    defaults = FailedAuthLimit()
    result = FailedAuthLimit(
        max_failures=_positive_int(section, "max_failures", defaults.max_failures, 1),
        window_seconds=section.take("window_seconds", float, defaults.window_seconds),
    )
    if result.window_seconds <= 0:
        raise section.fail("window_seconds", "must be positive")
    section.done()
    return result


# ISO 4217 codes Stripe Checkout takes in lower case; the customer sells in reais.
_CURRENCIES = ("brl", "usd", "eur")


def _package(item: _Section) -> Package:
    package_id = item.take("id", str, "")
    if not package_id or not package_id.replace("_", "").replace("-", "").isalnum():
        raise item.fail("id", "required: letters, digits, '_' and '-'")
    tokens = _positive_int(item, "tokens", 0, 1)
    price = _positive_int(item, "price", 0, 1)
    currency = item.take("currency", str, "BRL").lower()
    if currency not in _CURRENCIES:
        raise item.fail("currency", f"must be one of {', '.join(c.upper() for c in _CURRENCIES)}")
    package = Package(
        id=package_id,
        tokens=tokens,
        price=price,
        currency=currency,
        active=item.take("active", bool, True),
        name=item.take("name", str, ""),
    )
    item.done()
    return package


def _packages(section: _Section) -> tuple[Package, ...]:
    packages = tuple(_package(item) for item in section.items("packages"))
    seen: set[str] = set()
    for package in packages:
        if package.id in seen:
            raise section.fail("packages", f"package id {package.id!r} appears twice")
        seen.add(package.id)
    return packages


def _notices(section: _Section) -> NoticeSettings:
    result = NoticeSettings(in_conversation=section.take("in_conversation", bool, True))
    section.done()
    return result


def parse_settings(data: Any, source: str, env: Mapping[str, str]) -> Settings:
    top = _Section(source, "", data if data is not None else {})
    defaults = Settings()
    est = top.sub("estimate")
    estimate = EstimateSettings(
        chars_per_token=est.take("chars_per_token", float, 4.0),
        prompt_margin=est.take("prompt_margin", float, 1.2),
        default_completion_tokens=_positive_int(est, "default_completion_tokens", 1024, 1),
        minimum=_positive_int(est, "minimum", 100),
    )
    if estimate.chars_per_token <= 0:
        raise est.fail("chars_per_token", "must be positive")
    if estimate.prompt_margin <= 0:
        raise est.fail("prompt_margin", "must be positive")
    est.done()
    plans = tuple(_plan(item) for item in top.items("plans")) or defaults.plans
    upstream = top.sub("upstream")
    upstream_key = upstream.take("api_key", str, "")
    upstream.done()
    notifications = _notifications(top.sub("notifications"), env)
    admin_section = top.sub("admin")
    admin_failed_auth = _failed_auth(admin_section.sub("failed_auth"))
    admin = _admin_listener(admin_section, env, Path(source).parent)
    stripe = _stripe(top.sub("stripe"), env)
    decision_section = top.sub("decision")
    decision_limits = _decision_limits(decision_section)
    decision_tls = _decision_tls(decision_section.sub("tls"), Path(source).parent)
    decision_section.done()
    packages = _packages(top)
    notices = _notices(top.sub("notices"))
    settings = Settings(
        timezone=top.take_choice("timezone", ZoneInfo, defaults.timezone, "IANA time zone names"),
        language=top.take_choice("language", Language, defaults.language, "pt-BR, en"),
        admission_mode=top.take_choice("admission_mode", AdmissionMode, defaults.admission_mode, "default, strict"),
        default_plan=top.take("default_plan", str, plans[0].id),
        plans=plans,
        model_weights=_weights(top, "model_weights"),
        estimate=estimate,
        reservation_ttl_seconds=_positive_int(top, "reservation_ttl_seconds", 600, 1),
        on_store_error=top.take_choice("on_store_error", _deny_or_allow, "deny", "deny, allow"),
        usage_capture=top.take_choice("usage_capture", _usage_capture, defaults.usage_capture, "ext_proc, callback"),
        credits_email=top.take("credits_email", str, ""),
        purchase_url=top.take("purchase_url", str, ""),
        public_url=env.get("QUOTAGATE_PUBLIC_URL", top.take("public_url", str, defaults.public_url)).rstrip("/"),
        link_secret=env.get("QUOTAGATE_LINK_SECRET", top.take("link_secret", str, defaults.link_secret)),
        envoy_token=env.get("QUOTAGATE_ENVOY_TOKEN", top.take("envoy_token", str, defaults.envoy_token)),
        usage_token=env.get("QUOTAGATE_USAGE_TOKEN", top.take("usage_token", str, defaults.usage_token)),
        clients=tuple(_client(item) for item in top.items("clients")),
        upstream_api_key=env.get("QUOTAGATE_UPSTREAM_API_KEY", upstream_key),
        admin_tokens=tuple(_admin_token(item) for item in top.items("admin_tokens")),
        database_url=env.get("QUOTAGATE_DATABASE_URL", top.take("database_url", str, defaults.database_url)),
        redis_url=env.get("QUOTAGATE_REDIS_URL", top.take("redis_url", str, defaults.redis_url)),
        redis_prefix=top.take("redis_prefix", str, defaults.redis_prefix),
        grpc_listen=env.get("QUOTAGATE_GRPC_LISTEN", top.take("grpc_listen", str, defaults.grpc_listen)),
        decision_listen=_decision_listen(top, env, defaults.decision_listen),
        decision_limits=decision_limits,
        decision_tls=decision_tls,
        http_listen=env.get("QUOTAGATE_HTTP_LISTEN", top.take("http_listen", str, defaults.http_listen)),
        production=top.take("production", bool, False) or env.get("QUOTAGATE_ENV", "") == "production",
        rate_limit_files=_paths(top, "rate_limits", Path(source).parent),
        notifications=notifications,
        stripe=stripe,
        admin=admin,
        admin_failed_auth=admin_failed_auth,
        packages=packages,
        notices=notices,
        source=source,
    )
    top.done()
    if not any(p.id == settings.default_plan for p in settings.plans):
        raise ConfigError(f"{source}: default_plan: no plan named {settings.default_plan!r}")
    env_token = env.get("QUOTAGATE_ADMIN_TOKEN")
    if env_token and settings.production and len(env_token) < MIN_PRODUCTION_TOKEN_CHARS:
        raise ConfigError(
            f"{source}: QUOTAGATE_ADMIN_TOKEN: production needs at least {MIN_PRODUCTION_TOKEN_CHARS} characters"
        )
    if env_token:
        settings = _with_admin(settings, AdminToken("env", sha256_hex(env_token), "admin"))
    if settings.production and any(t.token_sha256 == sha256_hex(DEFAULT_ADMIN_TOKEN) for t in settings.admin_tokens):
        raise ConfigError(f"{source}: admin_tokens: production refuses the default admin token")
    if settings.production and not settings.admin_tokens:
        raise ConfigError(f"{source}: admin_tokens: production needs an admin token (QUOTAGATE_ADMIN_TOKEN)")
    if settings.production and settings.link_secret == DEFAULT_LINK_SECRET:
        raise ConfigError(f"{source}: link_secret: production needs a secret of its own (QUOTAGATE_LINK_SECRET)")
    _check_caller_tokens(settings)
    if settings.stripe.enabled:
        _check_stripe(settings)
    return settings


def _check_caller_tokens(settings: Settings) -> None:
    source = settings.source
    tokens = (
        ("envoy_token", "QUOTAGATE_ENVOY_TOKEN", settings.envoy_token, DEFAULT_ENVOY_TOKEN),
        ("usage_token", "QUOTAGATE_USAGE_TOKEN", settings.usage_token, DEFAULT_USAGE_TOKEN),
    )
    for key, variable, token, default in tokens:
        # It travels as an HTTP/2 header value (`authorization: Bearer <token>`).
        if not token or not all("!" <= c <= "~" for c in token):
            raise ConfigError(f"{source}: {key}: must be printable ASCII without spaces ({variable})")
        if settings.production and token == default:
            raise ConfigError(f"{source}: {key}: production needs a token of its own ({variable})")
        if settings.production and len(token) < MIN_PRODUCTION_TOKEN_CHARS:
            raise ConfigError(
                f"{source}: {key}: production needs at least {MIN_PRODUCTION_TOKEN_CHARS} characters ({variable})"
            )
    # Separate tokens, so the one Envoy holds cannot report usage and a reporter's cannot answer for Envoy.
    if settings.envoy_token == settings.usage_token:
        raise ConfigError(f"{source}: usage_token: must differ from envoy_token (QUOTAGATE_USAGE_TOKEN)")


def _check_stripe(settings: Settings) -> None:
    source = settings.source
    if settings.production and not settings.stripe.secret_key:
        raise ConfigError(f"{source}: stripe.secret_key: production needs QUOTAGATE_STRIPE_SECRET_KEY")
    if settings.production and not settings.stripe.webhook_secret:
        raise ConfigError(f"{source}: stripe.webhook_secret: production needs QUOTAGATE_STRIPE_WEBHOOK_SECRET")


def _paths(section: _Section, name: str, base: Path) -> tuple[Path, ...]:
    """A path or a list of paths; relative ones are taken from the config file's folder."""
    raw = section.data.pop(name, [])
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise section.fail(name, "expected a path or a list of paths")
    return tuple(p if p.is_absolute() else base / p for p in (Path(i) for i in items))


def _usage_capture(value: str) -> str:
    if value not in ("ext_proc", "callback"):
        raise ValueError(value)
    return value


def _deny_or_allow(value: str) -> str:
    if value not in ("deny", "allow"):
        raise ValueError(value)
    return value


def _with_admin(settings: Settings, token: AdminToken) -> Settings:
    from dataclasses import replace

    return replace(settings, admin_tokens=(*settings.admin_tokens, token))


def load_settings(path: Path | None, env: Mapping[str, str]) -> Settings:
    if path is None:
        configured = env.get("QUOTAGATE_CONFIG")
        path = Path(configured) if configured else None
    if path is None:
        return parse_settings({}, "<environment>", env)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, str(path), env)
