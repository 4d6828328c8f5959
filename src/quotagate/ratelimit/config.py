"""Rate-limit files in envoyproxy/ratelimit's YAML format, read into the values of `quotagate.ratelimit.model`.

A file holds one domain:

    domain: messaging
    descriptors:
      - key: message_type
        value: marketing
        descriptors:
          - key: to_number
            rate_limit: {unit: day, requests_per_unit: 5}

Everything the Go service accepts loads unchanged, with its meaning: units are matched case-insensitively, a value
ending in `*` matches by prefix, an empty `value` is no value, unquoted numbers and booleans used as strings keep
the text they were written with (`value: 010` is "010"). quotagate adds the unit `month` (a calendar month) and,
inside `rate_limit`, `counts: tokens` for limits whose hits are tokens (see `model.Counts`).

Validation is the Go service's plus stricter checks, all raised as RateLimitConfigError naming the file and the
dotted key path: unknown keys per level (Go accepts any of its keys at any level), a key given twice in one
mapping, wrong types and nulls, `unit`/`requests_per_unit` required unless `unlimited: true` (Go defaults a missing
`requests_per_unit` to 0, which blocks everything), a `unit` next to `unlimited: true` even if it is not a valid
unit, a `*` anywhere but at the end of a value, and `replaces` naming a limit that does not exist in the domain.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quotagate.ratelimit.model import Counts, Descriptor, Domain, RateLimit, RateLimitConfig, Unit

__all__ = [
    "MAX_DEPTH",
    "UNLIMITED_UNIT",
    "RateLimitConfigError",
    "load_ratelimit_config",
    "parse_domain",
]

# Deeper nesting than any request descriptor has; also stops a YAML alias that makes the tree refer to itself.
MAX_DEPTH = 64
# The model needs a unit; an unlimited limit has none in YAML (Go keeps UNKNOWN there) and never reads this one.
UNLIMITED_UNIT = Unit.SECOND

_UNITS = ", ".join(unit.value for unit in Unit)
_COUNTS = ", ".join(counts.value for counts in Counts)
_ROOT_KEYS = ("domain", "descriptors")
_DESCRIPTOR_KEYS = ("key", "value", "rate_limit", "descriptors", "shadow_mode", "detailed_metric")
_RATE_LIMIT_KEYS = ("unit", "requests_per_unit", "unlimited", "name", "replaces", "counts")
_REPLACES_KEYS = ("name",)
_SUFFIXES = (".yaml", ".yml")


class RateLimitConfigError(Exception):
    """A rate-limit file that cannot be used. str() is `<file>: <dotted key path>: <problem>`; the path is left out
    only for problems of the whole file (cannot be read, not YAML)."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(source, path, problem)
        self.source = source
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        if self.path:
            return f"{self.source}: {self.path}: {self.problem}"
        return f"{self.source}: {self.problem}"


# -- YAML ---------------------------------------------------------------------------------------------------------
# PyYAML turns `value: 010` into the integer 8 and `value: yes` into True; Go's yaml.v2 gives a string field the
# text as written. So integers and booleans remember their text, and timestamps stay strings (as in yaml.v2).


class _YamlInt(int):
    text: str

    def __new__(cls, value: int, text: str) -> _YamlInt:
        number = super().__new__(cls, value)
        number.text = text
        return number


@dataclass(frozen=True)
class _YamlBool:
    value: bool
    text: str


class _Mapping(dict[Hashable, Any]):
    """A YAML mapping; `repeated` lists the keys written more than once in it (PyYAML silently keeps the last)."""

    repeated: tuple[str, ...] = ()


class _Loader(yaml.SafeLoader):
    pass


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> _YamlInt:
    return _YamlInt(loader.construct_yaml_int(node), node.value)


def _construct_bool(loader: _Loader, node: yaml.ScalarNode) -> _YamlBool:
    return _YamlBool(loader.construct_yaml_bool(node), node.value)


def _construct_text(loader: _Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Mapping]:
    seen: set[str] = set()
    repeated: list[str] = []
    for key_node, _ in node.value:  # before merge keys (<<) are flattened in: overriding a merged key is fine
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen and key_node.value not in repeated:
                repeated.append(key_node.value)
            seen.add(key_node.value)
    mapping = _Mapping()
    mapping.repeated = tuple(repeated)
    yield mapping
    mapping.update(loader.construct_mapping(node))


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_text)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        if exc.encoding and exc.encoding != "unicode":  # the bytes could not be decoded
            return f"not {exc.encoding} text ({exc.reason} at byte {exc.position})"
        return f"unacceptable character #x{exc.character:04x} at position {exc.position} ({exc.reason})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "cannot be parsed"
        if mark is not None:
            return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
        return what
    return str(exc)


# -- values -------------------------------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    """A scalar as the Go service reads it into a string field; None when it is not one."""
    if isinstance(value, str):
        return value
    if isinstance(value, (_YamlInt, _YamlBool)):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (_YamlBool, bool)):
        return f"the boolean {_text(value)}"
    if isinstance(value, int):
        return f"the integer {_text(value)}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _DomainParser:
    """Reads one file's data; remembers limit names and `replaces` references to check them once the tree is read."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.names: set[str] = set()
        self.references: list[tuple[str, str]] = []  # (dotted path, name)

    def fail(self, path: str, problem: str) -> RateLimitConfigError:
        return RateLimitConfigError(self.source, path, problem)

    def mapping(self, data: object, path: str, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise self.fail(path or "top level", f"must be {what}, not {_describe(data)}")
        result: dict[str, Any] = {}
        for key, value in data.items():
            name = _text(key)
            if name not in allowed:
                shown = name if name is not None else repr(key)
                raise self.fail(_join(path, shown), f"unknown key (expected one of {', '.join(allowed)})")
            result[name] = value
        repeated: tuple[str, ...] = getattr(data, "repeated", ())
        if repeated:
            raise self.fail(_join(path, repeated[0]), "given more than once in the same mapping")
        return result

    def string(self, data: dict[str, Any], path: str, key: str, *, required: bool = False) -> str | None:
        if key not in data:
            if required:
                raise self.fail(_join(path, key), "required")
            return None
        text = _text(data[key])
        if text is None:
            raise self.fail(_join(path, key), f"must be a string, not {_describe(data[key])}")
        return text

    def non_empty(self, data: dict[str, Any], path: str, key: str) -> str:
        text = self.string(data, path, key, required=True)
        if not text:
            raise self.fail(_join(path, key), "must not be empty")
        return text

    def flag(self, data: dict[str, Any], path: str, key: str) -> bool:
        if key not in data:
            return False
        value = data[key]
        if isinstance(value, _YamlBool):
            return value.value
        if isinstance(value, bool):
            return value
        raise self.fail(_join(path, key), f"must be true or false, not {_describe(value)}")

    def count(self, data: dict[str, Any], path: str, key: str) -> int:
        value = data[key]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return int(value)
        raise self.fail(_join(path, key), f"must be a non-negative integer, not {_describe(value)}")

    def unit(self, data: dict[str, Any], path: str) -> Unit:
        value = data["unit"]
        text = _text(value)
        if text is None:
            raise self.fail(_join(path, "unit"), f"must be one of {_UNITS}, not {_describe(value)}")
        try:
            return Unit(text.lower())  # the Go service upper-cases it to find the enum name
        except ValueError:
            raise self.fail(_join(path, "unit"), f"{text!r} is not one of {_UNITS}") from None

    def counts(self, data: dict[str, Any], path: str) -> Counts:
        if "counts" not in data:
            return Counts.REQUESTS
        value = data["counts"]
        text = _text(value)
        if text is None:
            raise self.fail(_join(path, "counts"), f"must be one of {_COUNTS}, not {_describe(value)}")
        try:
            return Counts(text.lower())
        except ValueError:
            raise self.fail(_join(path, "counts"), f"{text!r} is not one of {_COUNTS}") from None

    def domain(self, data: object) -> Domain:
        root = self.mapping(data, "", _ROOT_KEYS, "a mapping with domain and descriptors")
        name = self.non_empty(root, "", "domain")
        descriptors = self.descriptors(root, "", 1)
        for path, replaced in self.references:
            if replaced not in self.names:
                raise self.fail(path, f"no rate_limit in domain {name!r} has the name {replaced!r}")
        return Domain(domain=name, descriptors=descriptors, source=self.source)

    def descriptors(self, data: dict[str, Any], path: str, depth: int) -> tuple[Descriptor, ...]:
        if "descriptors" not in data:
            return ()
        list_path = _join(path, "descriptors")
        items = data["descriptors"]
        if not isinstance(items, list):
            raise self.fail(list_path, f"must be a list of descriptors, not {_describe(items)}")
        if depth > MAX_DEPTH:
            raise self.fail(list_path, f"descriptors are nested more than {MAX_DEPTH} levels deep")
        result: list[Descriptor] = []
        first_at: dict[tuple[str, str | None], str] = {}
        for index, item in enumerate(items):
            item_path = f"{list_path}[{index}]"
            descriptor = self.descriptor(item, item_path, depth)
            identity = (descriptor.key, descriptor.value)
            if identity in first_at:
                value = "no value" if descriptor.value is None else f"value {descriptor.value!r}"
                raise self.fail(item_path, f"same key {descriptor.key!r} and {value} as {first_at[identity]}")
            first_at[identity] = item_path
            result.append(descriptor)
        return tuple(result)

    def descriptor(self, item: object, path: str, depth: int) -> Descriptor:
        data = self.mapping(item, path, _DESCRIPTOR_KEYS, "a descriptor mapping")
        key = self.non_empty(data, path, "key")
        value = self.string(data, path, "value") or None  # the Go service treats an empty value as no value
        if value is not None and "*" in value[:-1]:
            raise self.fail(
                _join(path, "value"), f"{value!r}: '*' is only supported at the end of a value (a prefix match)"
            )
        rate_limit = self.rate_limit(data["rate_limit"], _join(path, "rate_limit")) if "rate_limit" in data else None
        return Descriptor(
            key=key,
            value=value,
            rate_limit=rate_limit,
            shadow_mode=self.flag(data, path, "shadow_mode"),
            detailed_metric=self.flag(data, path, "detailed_metric"),
            descriptors=self.descriptors(data, path, depth + 1),
        )

    def rate_limit(self, item: object, path: str) -> RateLimit:
        data = self.mapping(item, path, _RATE_LIMIT_KEYS, "a rate_limit mapping")
        unlimited = self.flag(data, path, "unlimited")
        if unlimited:
            if "unit" in data:  # the Go service: "should not specify rate limit unit when unlimited"
                raise self.fail(_join(path, "unit"), "must not be set when unlimited is true")
            unit = UNLIMITED_UNIT
            # The Go service accepts (and ignores) requests_per_unit next to unlimited: true.
            requests_per_unit = self.count(data, path, "requests_per_unit") if "requests_per_unit" in data else 0
        else:
            for key in ("unit", "requests_per_unit"):
                if key not in data:
                    raise self.fail(_join(path, key), "required unless unlimited is true")
            unit = self.unit(data, path)
            requests_per_unit = self.count(data, path, "requests_per_unit")
        name = self.string(data, path, "name") or ""
        if name:
            self.names.add(name)
        return RateLimit(
            unit=unit,
            requests_per_unit=requests_per_unit,
            name=name,
            unlimited=unlimited,
            counts=self.counts(data, path),
            replaces=self.replaces(data, path, name),
        )

    def replaces(self, data: dict[str, Any], path: str, own_name: str) -> tuple[str, ...]:
        if "replaces" not in data:
            return ()
        list_path = _join(path, "replaces")
        items = data["replaces"]
        if not isinstance(items, list):
            raise self.fail(list_path, f"must be a list of {{name: ...}} entries, not {_describe(items)}")
        names: list[str] = []
        for index, item in enumerate(items):
            item_path = f"{list_path}[{index}]"
            entry = self.mapping(item, item_path, _REPLACES_KEYS, "a mapping with a name")
            name = self.non_empty(entry, item_path, "name")
            if name == own_name:
                raise self.fail(_join(item_path, "name"), f"{name!r} is this rate_limit's own name")
            self.references.append((_join(item_path, "name"), name))
            names.append(name)
        return tuple(names)


# -- public API ---------------------------------------------------------------------------------------------------


def parse_domain(data: object, source: str) -> Domain:
    """One domain from a file's parsed YAML; `source` names the file in errors and in Domain.source."""
    return _DomainParser(source).domain(data)


def _load_file(path: Path) -> Domain:
    source = str(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise RateLimitConfigError(source, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(content, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise RateLimitConfigError(source, "", f"invalid YAML: {_yaml_problem(exc)}") from exc
    return parse_domain(data, source)


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise RateLimitConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from exc
    return sorted(
        (
            entry
            for entry in entries
            if entry.suffix in _SUFFIXES and not entry.name.startswith(".") and entry.is_file()
        ),
        key=lambda entry: entry.name,
    )


def load_ratelimit_config(paths: Sequence[Path]) -> RateLimitConfig:
    """Every domain in `paths`, in order: a file holds one domain; a directory stands for its *.yaml and *.yml
    files (not hidden ones, not its subdirectories) sorted by name. A domain defined twice is an error naming both
    files (as the Go service without MERGE_DOMAIN_CONFIG)."""
    domains: dict[str, Domain] = {}
    for given in paths:
        for path in _files(given):
            domain = _load_file(path)
            if domain.domain in domains:
                first = domains[domain.domain].source
                raise RateLimitConfigError(domain.source, "domain", f"{domain.domain!r} is already defined in {first}")
            domains[domain.domain] = domain
    return RateLimitConfig(domains=domains)
