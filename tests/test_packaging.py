"""Lean and quiet packaging: SPDX license, matplotlib only in the `render` extra, the console
scripts, user-facing text free of internal wording, numba's cache falling back to a writable
directory, and an exporter port that is not Prometheus'."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from exporter.main import build_parser as exporter_parser
from ratelimit.cli import build_parsers
from ratelimit.storage.numba_cache import ensure_cache_dir, fallback_dir
from tests.support import EXAMPLES, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# A path no process can create, not even root's: a file cannot hold a directory.
UNWRITABLE = Path("/dev/null/numba-cache")


def test_license_is_an_spdx_expression() -> None:
    """The `license = {text = ...}` table is deprecated and makes setuptools print pages of warnings."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert int(PYPROJECT["build-system"]["requires"][0].split(">=")[1].split(".")[0]) >= 77


def test_matplotlib_is_only_in_the_render_extra() -> None:
    runtime = PYPROJECT["project"]["dependencies"]
    assert not any(requirement.lower().startswith("matplotlib") for requirement in runtime)
    assert any(requirement.startswith("matplotlib") for requirement in PYPROJECT["project"]["optional-dependencies"]["render"])


def test_console_scripts() -> None:
    assert PYPROJECT["project"]["scripts"] == {
        "ratelimit": "ratelimit.cli:main", "ratelimit-exporter": "exporter.main:main",
        "limitador-server": "ratelimit.cli:limitador_main",
    }


def test_help_texts_have_no_internal_wording() -> None:
    parser, commands = build_parsers()
    texts = [parser.format_help(), *(sub.format_help() for sub in commands.values()),
             exporter_parser().format_help(), (REPO / "README.md").read_text()]
    for text in texts:
        assert "seed" not in text.lower(), text[:200]


def test_exporter_default_port_is_not_prometheus() -> None:
    assert exporter_parser().parse_args(["limits.yaml"]).port not in (9090, 8080, 8081)


def test_numba_cache_falls_back_when_the_configured_one_cannot_be_written() -> None:
    env = {"NUMBA_CACHE_DIR": str(UNWRITABLE)}
    assert ensure_cache_dir(env) == fallback_dir()
    assert env["NUMBA_CACHE_DIR"] == str(fallback_dir())


def test_numba_cache_falls_back_when_the_package_directory_cannot_be_written() -> None:
    env: dict[str, str] = {}
    assert ensure_cache_dir(env, kernels_dir=UNWRITABLE) == fallback_dir()
    assert env == {"NUMBA_CACHE_DIR": str(fallback_dir())}


def test_numba_cache_left_alone_when_writable(tmp_path: Path) -> None:
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    assert ensure_cache_dir(env) is None and env == {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.parametrize("command", [["validate", str(EXAMPLES / "tiers.yaml")], ["--version"]])
def test_commands_work_with_an_unwritable_numba_cache(command: list[str]) -> None:
    """What a read-only image without its /tmp volume gives: the command works, and says where the
    kernels went."""
    done = subprocess.run([sys.executable, "-m", "ratelimit.cli", *command], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "NUMBA_CACHE_DIR": str(UNWRITABLE)})
    assert done.returncode == 0, done.stderr
    assert f"compiled kernels are cached in {fallback_dir()}" in done.stderr
