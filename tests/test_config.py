"""Settings: the YAML file plus QUOTAGATE_* environment variables (DESIGN.md "Commands and settings").

Unknown keys and bad values are errors that name the file and the (dotted) key; the environment wins over the
file for deploy-time values; production refuses a default or missing admin token.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import quotagate
from quotagate.config import ConfigError, Settings, load_settings, parse_settings
from quotagate.core.messages import Language
from quotagate.core.model import AdmissionMode, ModelWeight

CONFIGS = Path(__file__).parent / "configs"
VALID = CONFIGS / "valid.yaml"
DEMO = Path(quotagate.__file__).parent / "templates" / "demo.yaml"
REAL_TOKEN = "a-real-production-admin-token-5f2c9e"
LINK_SECRET = "a-real-link-secret-7d41a0"
# Envoy's and the usage reporter's tokens, which production also needs.
CALLER_TOKENS = {
    "QUOTAGATE_ENVOY_TOKEN": "a-real-envoy-token-3b9e1c",
    "QUOTAGATE_USAGE_TOKEN": "a-real-usage-token-8f02d4",
}
SRC_DEMO = Path(__file__).resolve().parents[1] / "src" / "quotagate" / "templates" / "demo.yaml"


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def config_error(path: Path | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return str(info.value)


def parse_error(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, "<test>", env or {})
    return str(info.value)


# -- a valid file ---------------------------------------------------------------------------------------------


def test_valid_file_reads_every_key() -> None:
    s = load_settings(VALID, {})
    assert s.source == str(VALID)
    assert s.timezone == ZoneInfo("America/Sao_Paulo")
    assert s.language is Language.PT_BR
    assert s.admission_mode is AdmissionMode.STRICT
    assert s.default_plan == "pro"
    assert s.credits_email == "creditos@example.com"
    assert s.purchase_url == "https://example.com/comprar"
    assert s.reservation_ttl_seconds == 300
    assert s.on_store_error == "allow"
    assert s.usage_capture == "callback"
    assert (s.estimate.chars_per_token, s.estimate.prompt_margin) == (3.5, 1.5)
    assert (s.estimate.default_completion_tokens, s.estimate.minimum) == (512, 50)
    assert [p.id for p in s.plans] == ["basic", "pro"]
    basic, pro = s.plans
    assert (basic.monthly_allowance, basic.warn_threshold, basic.critical_threshold) == (1_000_000, 0.75, 0.9)
    assert basic.weights == (ModelWeight("gpt-4*", 0.376, 0.376),)
    assert (pro.monthly_allowance, pro.warn_threshold, pro.critical_threshold, pro.weights) == (
        5_000_000,
        0.8,
        0.95,
        (),
    )
    assert s.model_weights == (ModelWeight("gpt-3.5-turbo*", 0.382, 0.382), ModelWeight("o1*", 2.0, 4.0))
    assert isinstance(s.model_weights[1].input, float)
    assert [(c.name, c.trusted, c.user_id) for c in s.clients] == [
        ("librechat", True, None),
        ("bob-personal", False, "bob"),
    ]
    assert s.clients[1].key_sha256 == sha("bob-personal-key")  # a plain key is kept only as its digest
    assert s.upstream_api_key == "sk-upstream-from-file"
    assert [(t.name, t.token_sha256, t.role) for t in s.admin_tokens] == [("ops", sha("ops-admin-token"), "operator")]
    assert s.database_url == "postgresql://db.internal:5432/quotagate"
    assert s.redis_url == "redis://cache.internal:6379/2"
    assert s.redis_prefix == "qgv:"
    assert s.grpc_listen == "0.0.0.0:50051"
    assert s.decision_listen == "0.0.0.0:50063"
    assert s.http_listen == "0.0.0.0:8080"
    assert s.production is False


def test_plan_lookup() -> None:
    s = load_settings(VALID, {})
    assert s.plan("pro").monthly_allowance == 5_000_000
    with pytest.raises(KeyError):
        s.plan("gold")


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    s = load_settings(path, {})
    defaults = Settings()
    assert s.timezone == ZoneInfo("UTC")
    assert s.language is Language.EN
    assert s.admission_mode is AdmissionMode.DEFAULT
    assert s.plans == defaults.plans
    assert s.default_plan == defaults.plans[0].id
    assert s.on_store_error == "deny"
    assert s.usage_capture == "ext_proc"
    assert s.production is False


def test_default_plan_defaults_to_the_first_plan() -> None:
    s = parse_settings({"plans": [{"id": "gold"}, {"id": "silver"}]}, "<test>", {})
    assert s.default_plan == "gold"


def test_plan_defaults() -> None:
    (plan,) = parse_settings({"plans": [{"id": "p"}]}, "<test>", {}).plans
    assert (plan.warn_threshold, plan.critical_threshold) == (0.80, 0.95)


def test_equal_thresholds_are_allowed() -> None:
    data = {"plans": [{"id": "p", "warn_threshold": 0.9, "critical_threshold": 0.9}]}
    assert parse_settings(data, "<test>", {}).plans[0].warn_threshold == 0.9


def test_uppercase_client_digest_is_accepted() -> None:
    digest = sha("k").upper()
    s = parse_settings({"clients": [{"name": "c", "key_sha256": digest, "trusted": True}]}, "<test>", {})
    assert s.client_by_key("k") is s.clients[0]


def test_client_without_a_name_gets_one_that_does_not_reveal_the_key() -> None:
    s = parse_settings({"clients": [{"key": "plain-secret-key", "trusted": True}]}, "<test>", {})
    assert s.clients[0].name
    assert "plain-secret-key" not in s.clients[0].name


# -- errors name the file and the dotted key --------------------------------------------------------------

BAD_FILES = [
    ("unknown_top_key.yaml", "languge"),
    ("unknown_plan_key.yaml", "plans[0].monthly_alowance"),
    ("bad_threshold.yaml", "plans[1].warn_threshold"),
    ("bad_timezone.yaml", "timezone"),
    ("untrusted_without_user.yaml", "clients[1].user_id"),
    ("bad_key_digest.yaml", "clients[0].key_sha256"),
    ("key_and_digest.yaml", "clients[0].key"),
    ("bad_admin_role.yaml", "admin_tokens[0].role"),
    ("unknown_default_plan.yaml", "default_plan"),
    ("warn_above_critical.yaml", "plans[0].warn_threshold"),
    ("wrong_type.yaml", "plans[0].monthly_allowance"),
    ("negative_allowance.yaml", "plans[0].monthly_allowance"),
    ("unknown_estimate_key.yaml", "estimate.chars_per_tokn"),
    ("bad_language.yaml", "language"),
    ("bad_admission_mode.yaml", "admission_mode"),
    ("bad_on_store_error.yaml", "on_store_error"),
    ("bad_usage_capture.yaml", "usage_capture"),
    ("zero_ttl.yaml", "reservation_ttl_seconds"),
    ("trusted_not_bool.yaml", "clients[0].trusted"),
    ("weight_without_pattern.yaml", "plans[0].model_weights[0].pattern"),
    ("unknown_upstream_key.yaml", "upstream.url"),
    ("decision_tls_missing_file.yaml", "decision.tls.cert"),
    ("decision_tls_without_key.yaml", "decision.tls.key"),
    ("decision_tls_missing_client_ca.yaml", "decision.tls.client_ca"),
    ("decision_tls_unknown_key.yaml", "decision.tls.ca"),
]


@pytest.mark.parametrize(("name", "key"), BAD_FILES)
def test_bad_file_error_names_file_and_key(name: str, key: str) -> None:
    path = CONFIGS / name
    text = config_error(path)
    assert str(path) in text
    assert key in text


def test_unknown_plan_key_is_the_misspelt_key_not_the_plan() -> None:
    text = config_error(CONFIGS / "unknown_plan_key.yaml")
    assert "plans[0].monthly_alowance" in text
    assert "unknown" in text


def test_bad_threshold_says_what_is_allowed() -> None:
    assert "fraction" in config_error(CONFIGS / "bad_threshold.yaml")


def test_unknown_default_plan_names_the_plan() -> None:
    assert "gold" in config_error(CONFIGS / "unknown_default_plan.yaml")


def test_warn_above_critical_mentions_critical() -> None:
    assert "critical_threshold" in config_error(CONFIGS / "warn_above_critical.yaml")


def test_bad_timezone_names_the_value() -> None:
    assert "Mars/Olympus" in config_error(CONFIGS / "bad_timezone.yaml")


def test_timezone_that_is_a_region_directory_is_a_config_error() -> None:
    # "America" is a directory in the zone database, not a zone; it must be reported like any bad zone name,
    # not escape as an OSError (which `quotagate check-config` would show as a traceback).
    path = CONFIGS / "timezone_is_a_region.yaml"
    text = config_error(path)
    assert str(path) in text and "timezone" in text


def test_not_yaml_names_the_file() -> None:
    path = CONFIGS / "not_yaml.yaml"
    text = config_error(path)
    assert str(path) in text
    assert "YAML" in text


def test_top_level_not_a_mapping_names_the_file() -> None:
    path = CONFIGS / "not_a_mapping.yaml"
    text = config_error(path)
    assert str(path) in text
    assert "mapping" in text


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    assert str(path) in config_error(path)


def test_non_hex_admin_digest_is_rejected() -> None:
    # A 64-character digest that is not hexadecimal can never match any token, like a bad client key digest.
    path = CONFIGS / "bad_admin_digest.yaml"
    text = config_error(path)
    assert str(path) in text and "admin_tokens[0].token_sha256" in text


def test_negative_output_weight_names_the_output_key() -> None:
    path = CONFIGS / "negative_output_weight.yaml"
    text = config_error(path)
    assert str(path) in text and "model_weights[0].output" in text


def test_negative_prompt_margin_is_rejected() -> None:
    # A negative margin makes every estimate of a non-empty prompt negative, which the cost function refuses at
    # request time; it is a bad value and must be caught when the config is read.
    path = CONFIGS / "negative_prompt_margin.yaml"
    text = config_error(path)
    assert str(path) in text and "estimate.prompt_margin" in text


def test_errors_do_not_echo_a_plain_client_key() -> None:
    assert "super-secret-plain-key" not in config_error(CONFIGS / "key_and_digest.yaml")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"estimate": {"chars_per_token": 0}}, "estimate.chars_per_token"),
        ({"estimate": {"default_completion_tokens": 0}}, "estimate.default_completion_tokens"),
        ({"estimate": {"minimum": -1}}, "estimate.minimum"),
        ({"estimate": ["x"]}, "estimate"),
        ({"plans": {"id": "p"}}, "plans"),
        ({"plans": [{"monthly_allowance": 5}]}, "plans[0].id"),
        ({"plans": [{"id": "p", "monthly_allowance": True}]}, "plans[0].monthly_allowance"),
        ({"plans": [{"id": "p", "critical_threshold": 0}]}, "plans[0].critical_threshold"),
        ({"plans": [{"id": "p", "model_weights": [{"pattern": "x", "input": -1}]}]}, "plans[0].model_weights[0].input"),
        ({"model_weights": [{"pattern": "x", "colour": "red"}]}, "model_weights[0].colour"),
        ({"clients": [{"key": "k", "trusted": True, "scope": "all"}]}, "clients[0].scope"),
        ({"clients": [{"trusted": True}]}, "clients[0].key_sha256"),
        ({"admin_tokens": [{"token_sha256": sha("t")}]}, "admin_tokens[0].name"),
        ({"admin_tokens": [{"name": "a", "token_sha256": "short"}]}, "admin_tokens[0].token_sha256"),
        ({"production": "yes"}, "production"),
        ({"redis_prefix": 5}, "redis_prefix"),
    ],
)
def test_parse_errors_name_the_dotted_key(data: dict[str, Any], key: str) -> None:
    text = parse_error(data)
    assert text.startswith("<test>")
    assert key in text


# -- environment overrides ------------------------------------------------------------------------------------


def test_env_overrides_win_over_the_file() -> None:
    env = {
        "QUOTAGATE_DATABASE_URL": "postgresql://env-db:5432/qg",
        "QUOTAGATE_REDIS_URL": "redis://env-redis:6379/5",
        "QUOTAGATE_GRPC_LISTEN": "127.0.0.1:6000",
        "QUOTAGATE_HTTP_LISTEN": "127.0.0.1:6001",
        "QUOTAGATE_DECISION_LISTEN": "127.0.0.1:6002",
        "QUOTAGATE_UPSTREAM_API_KEY": "sk-from-env",
    }
    s = load_settings(VALID, env)
    assert s.decision_listen == "127.0.0.1:6002"
    assert s.database_url == env["QUOTAGATE_DATABASE_URL"]
    assert s.redis_url == env["QUOTAGATE_REDIS_URL"]
    assert s.grpc_listen == env["QUOTAGATE_GRPC_LISTEN"]
    assert s.http_listen == env["QUOTAGATE_HTTP_LISTEN"]
    assert s.upstream_api_key == "sk-from-env"
    # the rest still comes from the file
    assert s.redis_prefix == "qgv:"
    assert s.default_plan == "pro"


def test_env_overrides_apply_without_a_file_value() -> None:
    s = parse_settings({}, "<test>", {"QUOTAGATE_DATABASE_URL": "postgresql://x/y"})
    assert s.database_url == "postgresql://x/y"
    assert s.redis_url == Settings().redis_url


def test_env_admin_token_is_added_as_its_digest() -> None:
    s = load_settings(VALID, {"QUOTAGATE_ADMIN_TOKEN": "env-admin-secret"})
    digests = {t.token_sha256 for t in s.admin_tokens}
    assert sha("env-admin-secret") in digests
    assert sha("ops-admin-token") in digests  # the file's token stays
    assert all("env-admin-secret" not in (t.name, t.token_sha256) for t in s.admin_tokens)


def test_quotagate_config_env_names_the_file() -> None:
    s = load_settings(None, {"QUOTAGATE_CONFIG": str(VALID)})
    assert s.default_plan == "pro"
    assert s.source == str(VALID)


def test_quotagate_config_env_bad_file_is_named() -> None:
    path = CONFIGS / "unknown_top_key.yaml"
    text = config_error(None, {"QUOTAGATE_CONFIG": str(path)})
    assert str(path) in text and "languge" in text


def test_no_file_and_no_env_gives_defaults() -> None:
    s = load_settings(None, {})
    assert s.plans == Settings().plans
    assert s.production is False


# -- production ---------------------------------------------------------------------------------------------


def test_production_refuses_to_start_without_an_admin_token() -> None:
    text = parse_error({}, {"QUOTAGATE_ENV": "production"})
    assert "admin" in text
    text = parse_error({"production": True})
    assert "admin" in text


def test_production_refuses_the_default_admin_token_from_env() -> None:
    text = parse_error({}, {"QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": "change-me"})
    assert text.startswith("<test>")
    assert "admin" in text.lower()


def test_production_refuses_the_default_admin_token_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prod.yaml"
    path.write_text(f"production: true\nadmin_tokens:\n  - name: ops\n    token_sha256: {sha('change-me')}\n")
    text = config_error(path)
    assert str(path) in text and "admin_tokens" in text


def test_production_refuses_the_default_token_even_next_to_a_good_one() -> None:
    data = {"production": True, "admin_tokens": [{"name": "ops", "token_sha256": sha("good-token")}]}
    text = parse_error(data, {"QUOTAGATE_ADMIN_TOKEN": "change-me"})
    assert "admin" in text.lower()


def test_production_with_a_real_admin_token_starts() -> None:
    env = {"QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": REAL_TOKEN, "QUOTAGATE_LINK_SECRET": LINK_SECRET}
    env |= CALLER_TOKENS
    s = parse_settings({}, "<test>", env)
    assert s.production is True
    assert [t.token_sha256 for t in s.admin_tokens] == [sha(REAL_TOKEN)]
    assert s.link_secret == LINK_SECRET
    s = parse_settings(
        {"production": True, "link_secret": LINK_SECRET},
        "<test>",
        {"QUOTAGATE_ADMIN_TOKEN": REAL_TOKEN, **CALLER_TOKENS},
    )
    assert s.production is True


def test_production_refuses_the_default_link_secret() -> None:
    text = parse_error({}, {"QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": REAL_TOKEN})
    assert "link_secret" in text and "QUOTAGATE_LINK_SECRET" in text


def test_outside_production_the_default_token_and_no_token_are_accepted() -> None:
    assert parse_settings({}, "<test>", {"QUOTAGATE_ADMIN_TOKEN": "change-me"}).production is False
    assert parse_settings({}, "<test>", {}).admin_tokens == ()


@pytest.mark.parametrize("file_value", [True, False])
def test_production_env_with_a_production_key_in_the_file(file_value: bool) -> None:
    # QUOTAGATE_ENV=production must not turn the file's own (valid) `production` key into an "unknown key".
    data = {"production": file_value}
    env = {"QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": REAL_TOKEN, "QUOTAGATE_LINK_SECRET": LINK_SECRET}
    env |= CALLER_TOKENS
    s = parse_settings(data, "<test>", env)
    assert s.production is True


def test_valid_file_in_production_env_loads() -> None:
    s = load_settings(VALID, {"QUOTAGATE_ENV": "production", "QUOTAGATE_LINK_SECRET": LINK_SECRET, **CALLER_TOKENS})
    assert s.production is True


@pytest.mark.parametrize(
    ("tokens", "setting"),
    [
        ({"QUOTAGATE_USAGE_TOKEN": CALLER_TOKENS["QUOTAGATE_USAGE_TOKEN"]}, "envoy_token"),  # the default
        ({"QUOTAGATE_ENVOY_TOKEN": CALLER_TOKENS["QUOTAGATE_ENVOY_TOKEN"]}, "usage_token"),
        ({**CALLER_TOKENS, "QUOTAGATE_ENVOY_TOKEN": "short-token"}, "envoy_token"),
        ({**CALLER_TOKENS, "QUOTAGATE_USAGE_TOKEN": "short-token"}, "usage_token"),
        ({**CALLER_TOKENS, "QUOTAGATE_USAGE_TOKEN": CALLER_TOKENS["QUOTAGATE_ENVOY_TOKEN"]}, "usage_token"),
        ({**CALLER_TOKENS, "QUOTAGATE_ENVOY_TOKEN": "a token with spaces in it"}, "envoy_token"),
    ],
)
def test_production_refuses_default_short_or_shared_caller_tokens(tokens: dict[str, str], setting: str) -> None:
    env = {"QUOTAGATE_ENV": "production", "QUOTAGATE_ADMIN_TOKEN": REAL_TOKEN, "QUOTAGATE_LINK_SECRET": LINK_SECRET}
    text = parse_error({}, env | tokens)
    assert setting in text and f"QUOTAGATE_{setting.split('_')[0].upper()}_TOKEN" in text, text


def test_caller_tokens_come_from_the_environment_or_the_file_and_stay_out_of_repr() -> None:
    s = parse_settings({}, "<test>", {})  # outside production the public defaults do
    assert s.envoy_token != s.usage_token
    s = parse_settings({"envoy_token": "from-the-file-0123456789"}, "<test>", CALLER_TOKENS)
    assert (s.envoy_token, s.usage_token) == tuple(CALLER_TOKENS.values())  # the environment wins
    assert not any(token in repr(s) for token in CALLER_TOKENS.values())


# -- client_by_key and purchase_hint ----------------------------------------------------------------------------


def test_client_by_key_finds_a_client_by_its_plain_key() -> None:
    s = load_settings(VALID, {})
    chat = s.client_by_key("librechat-secret-key")
    assert chat is not None and chat.name == "librechat" and chat.trusted
    bob = s.client_by_key("bob-personal-key")
    assert bob is not None and bob.user_id == "bob" and not bob.trusted


@pytest.mark.parametrize(
    "key",
    ["", "librechat-secret-key ", "LIBRECHAT-SECRET-KEY", sha("librechat-secret-key"), "bob", "ops-admin-token"],
)
def test_client_by_key_unknown_keys(key: str) -> None:
    assert load_settings(VALID, {}).client_by_key(key) is None


def test_purchase_hint_prefers_the_purchase_url() -> None:
    s = parse_settings({"purchase_url": "https://buy.example.com", "credits_email": "c@example.com"}, "<t>", {})
    assert s.purchase_hint == "https://buy.example.com"


def test_purchase_hint_falls_back_to_the_credits_address() -> None:
    s = parse_settings({"credits_email": "creditos@example.com"}, "<t>", {})
    assert s.purchase_hint == "mailto:creditos@example.com"


def test_purchase_hint_empty_without_either() -> None:
    assert parse_settings({}, "<t>", {}).purchase_hint == ""


# -- the shipped demo config -----------------------------------------------------------------------------------


def test_demo_config_is_the_one_in_src() -> None:
    assert SRC_DEMO.is_file()
    assert DEMO.resolve() == SRC_DEMO.resolve()


def test_demo_config_loads() -> None:
    s = load_settings(SRC_DEMO, {})
    assert s.timezone == ZoneInfo("America/Sao_Paulo")
    assert s.plan(s.default_plan).monthly_allowance > 0
    chat = s.client_by_key("demo-key")
    assert chat is not None and chat.trusted
    alice = s.client_by_key("alice-key")
    assert alice is not None and not alice.trusted and alice.user_id == "alice"
    assert s.purchase_hint  # a denied demo user is told where to get credits
    assert s.production is False


# -- the real CLI ----------------------------------------------------------------------------------------------


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "quotagate.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", [VALID, SRC_DEMO])
def test_cli_check_config_valid_exits_0(path: Path) -> None:
    done = run_check_config(path)
    assert done.returncode == 0, done.stderr
    assert str(path) in done.stdout


def test_cli_check_config_does_not_print_secrets() -> None:
    done = run_check_config(VALID)
    assert done.returncode == 0
    for secret in ("bob-personal-key", "sk-upstream-from-file"):
        assert secret not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "key"),
    [("unknown_plan_key.yaml", "plans[0].monthly_alowance"), ("bad_timezone.yaml", "timezone")],
)
def test_cli_check_config_bad_exits_1_naming_file_and_key(name: str, key: str) -> None:
    path = CONFIGS / name
    done = run_check_config(path)
    assert done.returncode == 1
    assert str(path) in done.stderr
    assert key in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_check_config_not_yaml_exits_1() -> None:
    path = CONFIGS / "not_yaml.yaml"
    done = run_check_config(path)
    assert done.returncode == 1
    assert str(path) in done.stderr


def test_check_config_validates_rate_limit_files_alone_and_through_the_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    good = tmp_path / "limits.yaml"
    good.write_text(
        "domain: quotagate\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 60}\n"
    )
    bad = tmp_path / "bad-limits.yaml"
    bad.write_text(
        "domain: quotagate\ndescriptors:\n  - key: user\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"
    )
    config = tmp_path / "quotagate.yaml"
    config.write_text(f"rate_limits: [{bad.name}]\n")

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "quotagate.cli", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = check(good)
    assert ok.returncode == 0 and "domain quotagate" in ok.stdout
    for path in (bad, config):
        failed = check(path)
        assert failed.returncode == 1
        assert f"{bad}: descriptors[0].rate_limit.unit:" in failed.stderr


def test_decision_listen_defaults_to_its_own_port_and_empty_turns_it_off() -> None:
    assert parse_settings({}, "<test>", {}).decision_listen == "127.0.0.1:50053"
    assert parse_settings({"decision_listen": ""}, "<test>", {}).decision_listen == ""
    assert parse_settings({}, "<test>", {"QUOTAGATE_DECISION_LISTEN": ""}).decision_listen == ""
    assert parse_settings({}, "<test>", {"QUOTAGATE_DECISION_LISTEN": "[::1]:7000"}).decision_listen == "[::1]:7000"


@pytest.mark.parametrize(
    ("config", "env", "named"),
    [
        ({"decision_listen": "50053"}, {}, "<test>: decision_listen: '50053' is not host:port"),
        ({"decision_listen": "localhost:http"}, {}, "<test>: decision_listen: 'localhost:http' is not host:port"),
        ({}, {"QUOTAGATE_DECISION_LISTEN": "0.0.0.0:70000"}, "<test>: QUOTAGATE_DECISION_LISTEN: '0.0.0.0:70000'"),
    ],
)
def test_a_decision_listen_that_is_not_host_and_port_is_refused(
    config: dict[str, str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(config, "<test>", env)
    assert str(raised.value).startswith(named)
