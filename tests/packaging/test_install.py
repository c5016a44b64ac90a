"""``pip install`` of keyrelay as a user does it gives a working command (DESIGN §7).

From a clean clone of this repository (its committed HEAD): an sdist and a wheel
built by PyPA's ``build``, and a ``git+file://`` URL, each installed into a fresh
venv that holds only the runtime dependencies (from the runtime lock, hashes
checked; no dev extras, no source tree on the path), then run as a user would:
``keyrelay --help``, ``keyrelay auth serve --help`` and a start against a bad config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# No network but the package index; pip's cache keeps the runtime lock's wheels.
TIMEOUT = 600


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clone") / "keyrelay"
    run("git", "clone", "--quiet", "--no-local", REPO, path, cwd=REPO)
    return path


@pytest.fixture(scope="module")
def dist(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend from this (locked) environment, offline.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, clone, cwd=clone)
    return out


@pytest.fixture(scope="module")
def runtime_venv(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the runtime lock's dependencies and nothing of keyrelay."""
    path = tmp_path_factory.mktemp("venv") / "v"
    venv.create(path, with_pip=True)
    pip = path / "bin" / "pip"
    run(pip, "install", "--quiet", "--require-hashes", "-r", "requirements/runtime.txt", cwd=clone)
    return path


def user_env(venv_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYRELAY_", "PYTHON"))}
    env["PATH"] = f"{venv_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_installed_command(venv_path: Path, workdir: Path) -> None:
    env = user_env(venv_path)
    keyrelay = venv_path / "bin" / "keyrelay"
    # The installed package, not a source tree (the cwd is an empty directory).
    where = run(
        venv_path / "bin" / "python",
        "-c",
        "import keyrelay; print(keyrelay.__file__)",
        cwd=workdir,
        env=env,
    )
    assert str(venv_path) in where, where
    assert "usage: keyrelay" in run(keyrelay, "--help", cwd=workdir, env=env)
    assert "--config" in run(keyrelay, "auth", "serve", "--help", cwd=workdir, env=env)
    bad = workdir / "auth.toml"
    bad.write_text('[auth]\nlisten = "127.0.0.1:0"\nskew_seconds = "soon"\n', encoding="utf-8")
    result = subprocess.run(
        [str(keyrelay), "auth", "serve", "--config", str(bad)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("keyrelay: "), lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["wheel", "sdist", "git"])
def test_an_installed_keyrelay_works(
    kind: str, clone: Path, dist: Path, runtime_venv: Path, tmp_path: Path
) -> None:
    pip = runtime_venv / "bin" / "pip"
    if kind == "git":
        target = f"git+file://{clone}"
    else:
        (target,) = (str(p) for p in dist.glob("*.whl" if kind == "wheel" else "*.tar.gz"))
    # Dependencies are already there from the lock. The wheel installs with --no-index:
    # its metadata asks for nothing the lock does not hold. An sdist or a git URL is
    # built first, in pip's isolated build environment (setuptools from the index).
    offline = ["--no-index"] if kind == "wheel" else []
    run(pip, "install", "--quiet", *offline, target, cwd=tmp_path)
    try:
        check_installed_command(runtime_venv, tmp_path)
    finally:
        run(pip, "uninstall", "--quiet", "--yes", "keyrelay", cwd=tmp_path)


def test_the_wheel_carries_the_generated_grpc_code(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("auth_pb2.py", "auth_pb2_grpc.py", "auth_pb2.pyi", "auth_pb2_grpc.pyi"):
        assert f"keyrelay/auth/v1/{name}" in names
    assert "keyrelay/py.typed" in names
