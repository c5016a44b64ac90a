"""The checked-in gRPC code is exactly what `make gen` produces from the proto today.

Same command line as the Makefile's ``$(PROTO_OUT)`` rule, into a temporary
directory; `make check-protos` runs this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "proto/keyrelay/auth/v1/auth.proto"
PACKAGE = Path("keyrelay/auth/v1")
GENERATED = ("auth_pb2.py", "auth_pb2.pyi", "auth_pb2_grpc.py", "auth_pb2_grpc.pyi")
STALE = "generated code is stale: run `make gen`"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            PROTO,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"
    return out / PACKAGE


@pytest.mark.parametrize("name", GENERATED)
def test_generated_file_matches_a_fresh_generation(fresh: Path, name: str) -> None:
    new = fresh / name
    assert new.is_file(), f"protoc did not produce {name}"
    checked_in = ROOT / "services" / PACKAGE / name
    assert checked_in.is_file(), f"{checked_in} is missing: {STALE}"
    assert checked_in.read_bytes() == new.read_bytes(), f"{checked_in.name}: {STALE}"


def test_protoc_writes_nothing_else(fresh: Path) -> None:
    # A new output file (e.g. a plugin that starts emitting one) must be checked in too.
    produced = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert produced == sorted(GENERATED), STALE
