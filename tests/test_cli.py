"""Command-line parsing: Limitador's options, its environment variables, and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit.cli import DEFAULT_LIMITS_FILE, Serve, Validate, main, parse_command
from ratelimit.server.app import ServiceConfig
from tests.conftest import EXAMPLES

FULL_ENV = {
    "LIMITS_FILE": "/env/limits.yaml",
    "HTTP_API_HOST": "10.0.0.1",
    "HTTP_API_PORT": "9080",
    "ENVOY_RLS_HOST": "10.0.0.2",
    "ENVOY_RLS_PORT": "9081",
    "RATE_LIMIT_HEADERS": "DRAFT_VERSION_03",
    "LIMIT_NAME_IN_PROMETHEUS_LABELS": "1",
    "RATELIMIT_API_TOKEN": "env-token",
    "RATELIMIT_RELOAD_INTERVAL": "5",
}


def serve_config(argv: list[str], env: dict[str, str] | None = None) -> ServiceConfig:
    command = parse_command(argv, env or {})
    assert isinstance(command, Serve)
    return command.config


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], env: dict[str, str] | None = None) -> str:
    """The message of a usage error, which must exit 2."""
    with pytest.raises(SystemExit) as exited:
        parse_command(argv, env or {})
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_limitadors() -> None:
    assert serve_config(["serve", "limits.yaml"]) == ServiceConfig(
        limits_file="limits.yaml",
        http_ip="0.0.0.0",
        http_port=8080,
        rls_ip="0.0.0.0",
        rls_port=8081,
        storage="memory",
        cache_size=None,
        rate_limit_headers="NONE",
        limit_name_in_labels=False,
        api_token=None,
        log_level="error",
    )


def test_short_options() -> None:
    config = serve_config(
        ["serve", "-B", "127.0.0.1", "-P", "18080", "-b", "127.0.0.2", "-p", "18081",
         "-H", "DRAFT_VERSION_03", "-l", "-vv", "limits.yaml", "memory", "-c", "5000"]
    )
    assert (config.http_ip, config.http_port, config.rls_ip, config.rls_port) == ("127.0.0.1", 18080, "127.0.0.2", 18081)
    assert (config.rate_limit_headers, config.limit_name_in_labels, config.log_level) == ("DRAFT_VERSION_03", True, "info")
    assert (config.storage, config.cache_size) == ("memory", 5000)


def test_long_options_anywhere() -> None:
    config = serve_config(
        ["serve", "limits.yaml", "--http-ip", "::1", "--http-port", "1", "memory", "--cache", "7",
         "--rls-ip", "::", "--rls-port", "65535", "--rate-limit-headers", "NONE", "--limit-name-in-labels",
         "--api-token", "secret", "--reload-interval", "0.5"]
    )
    assert (config.http_ip, config.http_port, config.rls_ip, config.rls_port) == ("::1", 1, "::", 65535)
    assert (config.cache_size, config.api_token, config.reload_interval, config.limit_name_in_labels) == (
        7, "secret", 0.5, True)


@pytest.mark.parametrize("count, level", [(0, "error"), (1, "warning"), (2, "info"), (3, "debug"), (4, "trace"), (6, "trace")])
def test_verbosity(count: int, level: str) -> None:
    argv = ["serve", "limits.yaml"] + (["-" + "v" * count] if count else [])
    assert serve_config(argv).log_level == level


def test_environment_variables() -> None:
    assert serve_config(["serve"], FULL_ENV) == ServiceConfig(
        limits_file="/env/limits.yaml",
        http_ip="10.0.0.1",
        http_port=9080,
        rls_ip="10.0.0.2",
        rls_port=9081,
        rate_limit_headers="DRAFT_VERSION_03",
        limit_name_in_labels=True,
        api_token="env-token",
        reload_interval=5.0,
    )


def test_command_line_overrides_environment() -> None:
    config = serve_config(
        ["serve", "cli.yaml", "-B", "127.0.0.1", "-P", "1111", "-b", "127.0.0.2", "-p", "2222",
         "-H", "NONE", "--api-token", "cli-token", "--reload-interval", "2"],
        FULL_ENV,
    )
    assert config == ServiceConfig(
        limits_file="cli.yaml",
        http_ip="127.0.0.1",
        http_port=1111,
        rls_ip="127.0.0.2",
        rls_port=2222,
        rate_limit_headers="NONE",
        limit_name_in_labels=True,  # a flag can only turn it on
        api_token="cli-token",
        reload_interval=2.0,
    )


@pytest.mark.parametrize("value, enabled", [("1", True), ("true", True), ("0", False), ("", False)])
def test_limit_name_label_variable(value: str, enabled: bool) -> None:
    config = serve_config(["serve", "x.yaml"], {"LIMIT_NAME_IN_PROMETHEUS_LABELS": value})
    assert config.limit_name_in_labels is enabled


def test_limitador_form_without_command() -> None:
    """`limitador-server [OPTIONS] LIMITS_FILE memory`, as the limitador-operator runs it."""
    assert serve_config(["--http-port", "8080", "--rls-port", "8081", "/etc/limits.yaml", "memory"]) == ServiceConfig(
        limits_file="/etc/limits.yaml"
    )


def test_storage_word_without_limits_file_uses_environment() -> None:
    config = serve_config(["serve", "memory", "-c", "10"], {"LIMITS_FILE": "/env/limits.yaml"})
    assert (config.limits_file, config.storage, config.cache_size) == ("/env/limits.yaml", "memory", 10)


def test_default_limits_file_is_the_tier_example() -> None:
    command = parse_command(["serve"], {})
    assert isinstance(command, Serve) and command.used_default_limits
    assert Path(command.config.limits_file) == DEFAULT_LIMITS_FILE
    assert DEFAULT_LIMITS_FILE.read_text() == (EXAMPLES / "tiers.yaml").read_text()
    assert DEFAULT_LIMITS_FILE.is_file()


def test_validate_forms() -> None:
    assert parse_command(["validate", "a.yaml"], {}) == Validate("a.yaml")
    assert parse_command(["serve", "--validate", "a.yaml"], {}) == Validate("a.yaml")
    assert parse_command(["--validate", "a.yaml"], {}) == Validate("a.yaml")
    assert parse_command(["validate"], {"LIMITS_FILE": "env.yaml"}) == Validate("env.yaml")


@pytest.mark.parametrize("storage", ["disk", "distributed"])
def test_other_storages_are_not_supported_yet(storage: str, capsys: pytest.CaptureFixture[str]) -> None:
    message = usage_error(["serve", "limits.yaml", storage, "redis://localhost:6379"], capsys)
    assert f"storage {storage!r} is not supported yet" in message


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["serve", "x.yaml", "-P", "http"], {}, "-P/--http-port: not an integer: 'http'"),
        (["serve", "x.yaml", "-p", "70000"], {}, "port must be between 1 and 65535"),
        (["serve", "x.yaml", "-H", "DraftVersion03"], {}, "must be one of NONE, DRAFT_VERSION_03"),
        (["serve", "x.yaml", "-c", "0"], {}, "-c/--cache: must be at least 1"),
        (["serve", "x.yaml"], {"HTTP_API_PORT": "eighty"}, "environment variable HTTP_API_PORT='eighty'"),
        (["serve", "x.yaml"], {"RATE_LIMIT_HEADERS": "draft"}, "environment variable RATE_LIMIT_HEADERS='draft'"),
        (["serve", "x.yaml", "mongodb"], {}, "unknown storage 'mongodb'"),
        (["serve", "x.yaml", "memory", "extra"], {}, "unexpected arguments after 'memory'"),
        (["serve", "x.yaml", "--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], env: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(argv, capsys, env)


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "serve" in usage_error([], capsys)


def test_main_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES / "stacked.yaml")]) == 0
    assert "max_value: 500000" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("- namespace: a\n  max_value: 1\n")
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"{bad}:1" in captured.err and "seconds" in captured.err
