"""Secrets that `quotagate up` makes once per state dir and reuses on the next run (never the public defaults)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["state_secret"]


def _read(path: Path) -> str | None:
    """The file's secret; "" for an empty file, None for no file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def state_secret(state_dir: Path, name: str) -> str:
    """The secret kept in `state_dir/name`, created (random, mode 0600) when the file is missing or empty."""
    path = state_dir / name
    existing = _read(path)
    if existing:
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_urlsafe(32)
    # Written whole under a private name first, then linked into place: a second `up` starting at the same
    # moment finds either no file or the complete one, never a half-written secret.
    draft = state_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(fresh + "\n")
        if existing is not None:
            os.replace(draft, path)  # it was empty: nothing to keep
            return fresh
        try:
            os.link(draft, path)
        except FileExistsError:
            return _read(path) or fresh  # another run made it first: use theirs
        return fresh
    finally:
        with contextlib.suppress(FileNotFoundError):
            draft.unlink()
