"""Rate-limit files in envoyproxy/ratelimit's YAML format (quotagate.ratelimit.config).

The README's examples (and the Go repository's demo config, domain "rl") load unchanged into the model; quotagate's
additions (month, counts: tokens) and the Go service's leniencies (unit case, unquoted numbers as values) load too;
every invalid file is an error naming the file and the dotted key path; directories and several files load
together, and a domain defined twice is an error naming both files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from quotagate.ratelimit.config import (
    MAX_DEPTH,
    UNLIMITED_UNIT,
    RateLimitConfigError,
    load_ratelimit_config,
    parse_domain,
)
from quotagate.ratelimit.model import Counts, Descriptor, Domain, RateLimit, Unit

CONFIGS = Path(__file__).parent / "ratelimit_configs"
README = CONFIGS / "readme"
QUOTAGATE = CONFIGS / "quotagate"
BAD = CONFIGS / "bad"
DUPLICATE = CONFIGS / "duplicate_domain"


def load_one(path: Path) -> Domain:
    config = load_ratelimit_config([path])
    assert len(config.domains) == 1
    (domain,) = config.domains.values()
    assert config.domains == {domain.domain: domain}
    assert domain.source == str(path)
    return domain


def load_error(paths: list[Path]) -> RateLimitConfigError:
    with pytest.raises(RateLimitConfigError) as info:
        load_ratelimit_config(paths)
    return info.value


def limit(
    unit: Unit,
    requests_per_unit: int,
    *,
    name: str = "",
    unlimited: bool = False,
    counts: Counts = Counts.REQUESTS,
    replaces: tuple[str, ...] = (),
) -> RateLimit:
    return RateLimit(unit, requests_per_unit, name=name, unlimited=unlimited, counts=counts, replaces=replaces)


UNLIMITED = RateLimit(unit=UNLIMITED_UNIT, requests_per_unit=0, unlimited=True)


# -- the README's examples ------------------------------------------------------------------------------------------


def test_example_1_two_values_of_one_key() -> None:
    domain = load_one(README / "1_mongo_cps.yaml")
    assert domain.domain == "mongo_cps"
    assert domain.descriptors == (
        Descriptor("database", "users", limit(Unit.SECOND, 500)),
        Descriptor("database", "default", limit(Unit.SECOND, 500)),
    )


def test_example_2_nested_descriptors_under_a_placeholder() -> None:
    domain = load_one(README / "2_messaging.yaml")
    assert domain.domain == "messaging"
    assert domain.descriptors == (
        Descriptor(
            "message_type",
            "marketing",
            rate_limit=None,
            descriptors=(Descriptor("to_number", None, limit(Unit.DAY, 5)),),
        ),
        Descriptor("to_number", None, limit(Unit.DAY, 100)),
    )


def test_example_3_key_only_default_and_a_blocked_value() -> None:
    domain = load_one(README / "3_edge_proxy_per_ip.yaml")
    assert domain.domain == "edge_proxy_per_ip"
    assert domain.descriptors == (
        Descriptor("remote_address", None, limit(Unit.SECOND, 10)),
        Descriptor("remote_address", "50.0.0.5", limit(Unit.SECOND, 0)),
    )


def test_example_4_limit_on_the_second_level() -> None:
    domain = load_one(README / "4_example4.yaml")
    assert domain.descriptors == (
        Descriptor("key", "value", descriptors=(Descriptor("subkey", None, limit(Unit.SECOND, 300)),)),
    )


def test_example_5_unlimited() -> None:
    domain = load_one(README / "5_internal.yaml")
    assert domain.domain == "internal"
    assert domain.descriptors == (
        Descriptor("ldap", None, UNLIMITED),
        Descriptor("azure", None, limit(Unit.MINUTE, 100)),
    )
    ldap = domain.descriptors[0].rate_limit
    assert ldap is not None and ldap.unlimited
    azure = domain.descriptors[1].rate_limit
    assert azure is not None and not azure.unlimited


def test_example_6_shadow_mode() -> None:
    domain = load_one(README / "6_example6.yaml")
    assert domain.descriptors == (
        Descriptor(
            "service",
            descriptors=(
                Descriptor("user", "user-a", limit(Unit.SECOND, 10), shadow_mode=True),
                Descriptor("user", "user-b", limit(Unit.SECOND, 20), shadow_mode=False),
            ),
        ),
    )


def test_example_7_replaces() -> None:
    domain = load_one(README / "7_example7.yaml")
    assert domain.descriptors == (
        Descriptor(
            "key_1",
            "value_1",
            descriptors=(Descriptor("user", "bkthomps", limit(Unit.SECOND, 5, name="specific_limit")),),
        ),
        Descriptor(
            "key_2",
            "value_2",
            descriptors=(Descriptor("user", "bkthomps", limit(Unit.SECOND, 10, replaces=("specific_limit",))),),
        ),
    )


def test_example_8_detailed_metric() -> None:
    domain = load_one(README / "8_example8.yaml")
    assert domain.descriptors == (
        Descriptor("key1", None, limit(Unit.MINUTE, 10), detailed_metric=True),
        Descriptor("key1", "value1", limit(Unit.MINUTE, 20), detailed_metric=False),
    )


def test_example_9_trailing_wildcard_value_is_kept() -> None:
    domain = load_one(README / "9_example9.yaml")
    assert domain.descriptors == (Descriptor("key1", "value*", limit(Unit.MINUTE, 20)),)


def test_demo_config_rl() -> None:
    domain = load_one(README / "rl.yml")
    assert domain.domain == "rl"
    assert domain.descriptors == (
        Descriptor(
            "source_cluster",
            "proxy",
            descriptors=(Descriptor("destination_cluster", "mock", limit(Unit.MINUTE, 1)),),
        ),
        Descriptor(
            "foo",
            None,
            limit(Unit.MINUTE, 2),
            descriptors=(
                Descriptor("bar", None, limit(Unit.MINUTE, 3)),
                Descriptor("bar", "banned", limit(Unit.MINUTE, 0)),
                Descriptor("baz", None, limit(Unit.SECOND, 1)),
                Descriptor("bay", None, UNLIMITED),
                Descriptor("baz", "shady", limit(Unit.MINUTE, 1), shadow_mode=True),
            ),
        ),
        Descriptor("qux", None, UNLIMITED),
    )


# -- quotagate's additions and the Go service's leniencies ---------------------------------------------------------


def test_months_and_token_limits() -> None:
    domain = load_one(QUOTAGATE / "llm.yaml")
    assert domain.descriptors == (
        Descriptor(
            "user",
            None,
            limit(Unit.MONTH, 2_000_000, name="user_monthly_tokens", counts=Counts.TOKENS),
            descriptors=(Descriptor("model", "gpt-4*", limit(Unit.DAY, 50_000, counts=Counts.TOKENS)),),
        ),
        Descriptor(
            "user", "ceo", limit(Unit.MONTH, 10_000_000, counts=Counts.TOKENS, replaces=("user_monthly_tokens",))
        ),
        Descriptor("user", "intern", limit(Unit.MINUTE, 30, counts=Counts.REQUESTS)),
    )


def test_what_the_go_service_accepts_loads_with_its_meaning() -> None:
    domain = load_one(QUOTAGATE / "go_compat.yaml")
    assert domain.descriptors == (
        Descriptor("to_number", "2061111111", limit(Unit.MINUTE, 5)),  # unquoted number; unit: MINUTE
        Descriptor("code", "010", limit(Unit.HOUR, 5)),  # the text as written, not 8; merge key; unit: Hour
        Descriptor("flag", "yes"),  # not True; neither a limit nor children
        Descriptor("day", "2024-01-31", limit(Unit.DAY, 1)),  # not a date
        Descriptor("anything", None, RateLimit(UNLIMITED_UNIT, 25, unlimited=True)),  # value "" is no value
        Descriptor("switch", None, limit(Unit.SECOND, 3, unlimited=False)),
    )
    assert all(isinstance(d.value, str) and type(d.value) is str for d in domain.descriptors[:4])


def test_parse_domain_takes_plain_data() -> None:
    data = {
        "domain": "inline",
        "descriptors": [
            {
                "key": "tier",
                "value": 7,
                "shadow_mode": True,
                "rate_limit": {"unit": "Day", "requests_per_unit": 3, "counts": "tokens"},
            },
            {"key": "beta", "value": False, "detailed_metric": True},
        ],
    }
    assert parse_domain(data, "<inline>") == Domain(
        "inline",
        (
            Descriptor("tier", "7", limit(Unit.DAY, 3, counts=Counts.TOKENS), shadow_mode=True),
            Descriptor("beta", "false", detailed_metric=True),
        ),
        source="<inline>",
    )


def test_parse_domain_errors_name_the_source() -> None:
    data = {"domain": "inline", "descriptors": [{"key": "k", "rate_limit": {"unit": "week", "requests_per_unit": 1}}]}
    with pytest.raises(RateLimitConfigError) as info:
        parse_domain(data, "<inline>")
    assert (
        str(info.value)
        == "<inline>: descriptors[0].rate_limit.unit: 'week' is not one of second, minute, hour, day, month"
    )


# -- invalid files: one fixture each, the exact message -------------------------------------------------------------

INVALID = {
    "unit_unknown.yaml": "descriptors[0].rate_limit.unit: 'fortnight' is not one of second, minute, hour, day, month",
    "unit_year.yaml": "descriptors[0].rate_limit.unit: 'year' is not one of second, minute, hour, day, month",
    "unit_not_string.yaml": (
        "descriptors[0].rate_limit.unit: must be one of second, minute, hour, day, month, not a list"
    ),
    "unit_missing.yaml": "descriptors[0].rate_limit.unit: required unless unlimited is true",
    "requests_missing.yaml": "descriptors[0].rate_limit.requests_per_unit: required unless unlimited is true",
    "unlimited_with_unit.yaml": "descriptors[0].rate_limit.unit: must not be set when unlimited is true",
    "unlimited_with_bad_unit.yaml": "descriptors[0].rate_limit.unit: must not be set when unlimited is true",
    "unlimited_not_bool.yaml": "descriptors[0].rate_limit.unlimited: must be true or false, not the string 'true'",
    "requests_negative.yaml": (
        "descriptors[0].rate_limit.requests_per_unit: must be a non-negative integer, not the integer -1"
    ),
    "requests_string.yaml": (
        "descriptors[0].rate_limit.requests_per_unit: must be a non-negative integer, not the string '10'"
    ),
    "requests_float.yaml": (
        "descriptors[0].rate_limit.requests_per_unit: must be a non-negative integer, not the number 1.5"
    ),
    "requests_bool.yaml": (
        "descriptors[0].rate_limit.requests_per_unit: must be a non-negative integer, not the boolean true"
    ),
    "unknown_key_top.yaml": "unit: unknown key (expected one of domain, descriptors)",
    "unknown_key_descriptor.yaml": (
        "descriptors[0].ratelimit: unknown key "
        "(expected one of key, value, rate_limit, descriptors, shadow_mode, detailed_metric)"
    ),
    "unknown_key_rate_limit.yaml": (
        "descriptors[0].rate_limit.requestsperunit: unknown key "
        "(expected one of unit, requests_per_unit, unlimited, name, replaces, counts)"
    ),
    "unknown_key_replaces.yaml": "descriptors[1].rate_limit.replaces[0].value: unknown key (expected one of name)",
    "non_string_key.yaml": (
        "descriptors[0].0.25: unknown key "
        "(expected one of key, value, rate_limit, descriptors, shadow_mode, detailed_metric)"
    ),
    "key_repeated.yaml": "descriptors[0].rate_limit.unit: given more than once in the same mapping",
    "key_missing.yaml": "descriptors[0].key: required",
    "key_empty.yaml": "descriptors[1].descriptors[0].key: must not be empty",
    "key_null.yaml": "descriptors[0].key: must be a string, not null",
    "domain_missing.yaml": "domain: required",
    "domain_empty.yaml": "domain: must not be empty",
    "domain_not_string.yaml": "domain: must be a string, not a list",
    "duplicate_descriptor.yaml": "descriptors[2]: same key 'key1' and value 'value1' as descriptors[0]",
    "duplicate_descriptor_empty_value.yaml": (
        "descriptors[0].descriptors[1]: same key 'subkey' and no value as descriptors[0].descriptors[0]"
    ),
    "replaces_unknown.yaml": (
        "descriptors[1].descriptors[0].rate_limit.replaces[0].name: "
        "no rate_limit in domain 'example7' has the name 'specific_limt'"
    ),
    "replaces_self.yaml": (
        "descriptors[0].descriptors[0].rate_limit.replaces[0].name: 'self' is this rate_limit's own name"
    ),
    "replaces_empty_name.yaml": "descriptors[0].rate_limit.replaces[0].name: must not be empty",
    "replaces_not_list.yaml": (
        "descriptors[1].rate_limit.replaces: must be a list of {name: ...} entries, not the string 'a'"
    ),
    "replaces_entry_not_mapping.yaml": (
        "descriptors[1].rate_limit.replaces[0]: must be a mapping with a name, not the string 'a'"
    ),
    "name_not_string.yaml": "descriptors[0].rate_limit.name: must be a string, not a mapping",
    "not_a_mapping.yaml": "top level: must be a mapping with domain and descriptors, not a list",
    "empty.yaml": "top level: must be a mapping with domain and descriptors, not null",
    "not_yaml.yaml": "invalid YAML: expected ',' or '}', but got '<stream end>' at line 5, column 1",
    "not_utf8.yaml": "invalid YAML: not utf-8 text (invalid continuation byte at byte 11)",
    "descriptor_not_mapping.yaml": "descriptors[0]: must be a descriptor mapping, not the string 'a'",
    "descriptors_not_list.yaml": "descriptors: must be a list of descriptors, not a mapping",
    "rate_limit_null.yaml": "descriptors[0].rate_limit: must be a rate_limit mapping, not null",
    "shadow_mode_string.yaml": "descriptors[0].shadow_mode: must be true or false, not the string 'true'",
    "detailed_metric_int.yaml": "descriptors[0].detailed_metric: must be true or false, not the integer 1",
    "counts_unknown.yaml": "descriptors[0].rate_limit.counts: 'bytes' is not one of requests, tokens",
    "value_mid_wildcard.yaml": (
        "descriptors[0].value: '/api*/v1': '*' is only supported at the end of a value (a prefix match)"
    ),
    "value_not_string.yaml": "descriptors[0].value: must be a string, not a list",
    "value_float.yaml": "descriptors[0].value: must be a string, not the number 1.5",
    "descriptors_cycle.yaml": (
        "descriptors" + "[0].descriptors" * MAX_DEPTH + f": descriptors are nested more than {MAX_DEPTH} levels deep"
    ),
}


@pytest.mark.parametrize(("name", "message"), sorted(INVALID.items()))
def test_invalid_file(name: str, message: str) -> None:
    assert str(load_error([BAD / name])) == f"{BAD / name}: {message}"


def test_every_invalid_fixture_has_its_message() -> None:
    assert sorted(path.name for path in BAD.iterdir()) == sorted(INVALID)


def test_error_carries_file_path_and_problem() -> None:
    error = load_error([BAD / "unit_unknown.yaml"])
    assert error.source == str(BAD / "unit_unknown.yaml")
    assert error.path == "descriptors[0].rate_limit.unit"
    assert error.problem == "'fortnight' is not one of second, minute, hour, day, month"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path) == (str(error), error.path)


def test_a_file_that_cannot_be_read() -> None:
    missing = CONFIGS / "no_such_file.yaml"
    assert str(load_error([missing])) == f"{missing}: cannot read: No such file or directory"


# -- several files, directories, duplicate domains -----------------------------------------------------------------


def test_directory_loads_its_yaml_and_yml_files_sorted_by_name() -> None:
    config = load_ratelimit_config([README])
    assert list(config.domains) == [
        "mongo_cps",
        "messaging",
        "edge_proxy_per_ip",
        "example4",
        "internal",
        "example6",
        "example7",
        "example8",
        "example9",
        "rl",
    ]
    assert "hidden" not in config.domains  # .editor-backup.yaml is skipped; NOTES.txt is not YAML
    assert config.domains["rl"].source == str(README / "rl.yml")
    assert config.domains["mongo_cps"] == load_one(README / "1_mongo_cps.yaml")


def test_several_paths_load_in_the_order_given() -> None:
    config = load_ratelimit_config([README / "9_example9.yaml", QUOTAGATE, README / "1_mongo_cps.yaml"])
    assert list(config.domains) == ["example9", "compat", "llm", "mongo_cps"]
    assert [d.source for d in config.domains.values()] == [
        str(README / "9_example9.yaml"),
        str(QUOTAGATE / "go_compat.yaml"),
        str(QUOTAGATE / "llm.yaml"),
        str(README / "1_mongo_cps.yaml"),
    ]


def test_an_empty_directory_has_no_domains(tmp_path: Path) -> None:
    assert load_ratelimit_config([tmp_path]).domains == {}
    assert load_ratelimit_config([]).domains == {}


def test_duplicate_domain_in_a_directory_names_both_files() -> None:
    error = load_error([DUPLICATE])
    assert str(error) == f"{DUPLICATE / 'b.yml'}: domain: 'shared' is already defined in {DUPLICATE / 'a.yaml'}"


def test_duplicate_domain_across_paths_names_both_files() -> None:
    error = load_error([DUPLICATE / "b.yml", README, DUPLICATE / "a.yaml"])
    assert str(error) == f"{DUPLICATE / 'a.yaml'}: domain: 'shared' is already defined in {DUPLICATE / 'b.yml'}"


def test_an_invalid_file_in_a_directory_stops_the_load() -> None:
    error = load_error([README, BAD])
    assert error.source == str(BAD / "counts_unknown.yaml")  # the first in name order
