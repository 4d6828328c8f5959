"""The committed stubs in src/quotagate/v1 are what scripts/gen-protos makes from protos/ today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "src" / "quotagate" / "v1"
PATTERNS = ("*_pb2.py", "*_pb2_grpc.py", "*.pyi")


def generated_names(directory: Path) -> set[str]:
    return {p.name for pattern in PATTERNS for p in directory.glob(pattern)}


def test_regenerated_stubs_match_the_committed_ones(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "quotagate" / "v1"
    fresh_names = generated_names(fresh)
    protos = sorted(p.stem for p in (ROOT / "protos" / "quotagate" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    # each .proto gives a message module, a gRPC module and a stub for each
    for stem in protos:
        assert {f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.pyi"} <= fresh_names
    assert generated_names(COMMITTED) == fresh_names
    stale = [name for name in sorted(fresh_names) if (fresh / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert stale == [], f"out of date, run scripts/gen-protos: {stale}"
