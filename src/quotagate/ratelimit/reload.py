"""Rate-limit config files that apply their edits within seconds, and keep the last good config when an edit
is broken."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from quotagate.ratelimit.config import RateLimitConfigError, load_ratelimit_config
from quotagate.ratelimit.model import RateLimitConfig

log = logging.getLogger("quotagate.ratelimit")


def _fingerprint(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Every file that makes up the config, with its modification time and size."""
    seen: list[tuple[str, int, int]] = []
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                seen.append((str(file), -1, -1))
                continue
            seen.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(seen)


class ReloadingConfig:
    """The current rate-limit config; `watch()` reloads it when its files change."""

    def __init__(self, paths: Sequence[Path], on_error: Callable[[str], None] | None = None) -> None:
        self.paths = tuple(paths)
        self._on_error = on_error or (lambda message: None)
        self._fingerprint = _fingerprint(self.paths)
        self._config = load_ratelimit_config(self.paths)  # a broken file at start is an error, not a fallback

    def current(self) -> RateLimitConfig:
        return self._config

    def reload_if_changed(self) -> bool:
        fingerprint = _fingerprint(self.paths)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        try:
            config = load_ratelimit_config(self.paths)
        except RateLimitConfigError as exc:
            log.error("rate-limit config not reloaded, the previous one stays: %s", exc)
            self._on_error(str(exc))
            return False
        self._config = config
        log.info("rate-limit config reloaded: %s", ", ".join(sorted(config.domains)))
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
