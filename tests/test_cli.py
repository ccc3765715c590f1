"""Command-line parsing: Limitador's options, its environment variables, and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit.cli import DEFAULT_LIMITS_FILE, Serve, Validate, main, parse_command
from ratelimit.server.app import ServiceConfig
from tests.support import EXAMPLES

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


@pytest.mark.parametrize("value, enabled", [("1", True), ("0", False), ("", False)])
def test_limit_name_label_variable(value: str, enabled: bool) -> None:
    config = serve_config(["serve", "x.yaml"], {"LIMIT_NAME_IN_PROMETHEUS_LABELS": value})
    assert config.limit_name_in_labels is enabled


@pytest.mark.parametrize("name", ["LIMIT_NAME_IN_PROMETHEUS_LABELS", "REDIS_LOCAL_CACHE_ENABLED"])
def test_boolean_variables_other_than_1_or_0_are_refused(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Limitador reads only "1" as on: "true" would be off there, so it is refused, not guessed."""
    env = {name: "true", "REDIS_URL": "redis://127.0.0.1:6379"}
    assert f"environment variable {name}='true': set it to 1 to enable" in usage_error(["serve", "x.yaml"], capsys, env)


# -- storage from the environment, as Limitador's storage_config_from_env ---------------------------


def test_redis_url_alone_means_redis_storage() -> None:
    config = serve_config(["serve", "x.yaml"], {"REDIS_URL": "redis://redis:6379/0"})
    assert (config.storage, config.storage_url) == ("redis", "redis://redis:6379/0")


def test_redis_url_with_local_cache_means_redis_cached_with_its_variables() -> None:
    config = serve_config(["serve", "x.yaml"], {
        "REDIS_URL": "redis://redis:6379", "REDIS_LOCAL_CACHE_ENABLED": "1",
        "REDIS_LOCAL_CACHE_BATCH_SIZE": "50", "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS": "250",
    })
    assert (config.storage, config.storage_url, config.batch_size, config.flush_period) == (
        "redis_cached", "redis://redis:6379", 50, 0.25)


def test_storage_words_take_their_url_and_cache_defaults_from_the_environment() -> None:
    env = {"REDIS_URL": "redis://env:6379", "REDIS_LOCAL_CACHE_BATCH_SIZE": "7"}
    cached = serve_config(["serve", "x.yaml", "redis_cached"], env)
    assert (cached.storage, cached.storage_url, cached.batch_size) == ("redis_cached", "redis://env:6379", 7)
    flagged = serve_config(["serve", "x.yaml", "redis_cached", "redis://cli:6379", "--batch-size", "9"], env)
    assert (flagged.storage_url, flagged.batch_size) == ("redis://cli:6379", 9)  # the command line wins


def test_a_storage_on_the_command_line_wins_over_redis_url_and_says_so() -> None:
    command = parse_command(["serve", "x.yaml", "memory"], {"REDIS_URL": "redis://redis:6379"})
    assert isinstance(command, Serve) and command.config.storage == "memory"
    assert any("REDIS_URL is set" in notice for notice in command.notices)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"REDIS_LOCAL_CACHE_ENABLED": "1"}, "REDIS_LOCAL_CACHE_ENABLED needs REDIS_URL"),
        ({"REDIS_LOCAL_CACHE_BATCH_SIZE": "10"}, "REDIS_LOCAL_CACHE_BATCH_SIZE needs REDIS_URL"),
        ({"REDIS_URL": "redis://r:6379", "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS": "10"},
         "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS only applies with REDIS_LOCAL_CACHE_ENABLED=1"),
        ({"REDIS_URL": "mongodb://r"}, "environment variable REDIS_URL"),
        ({"REDIS_URL": "redis://r", "REDIS_LOCAL_CACHE_ENABLED": "1", "REDIS_LOCAL_CACHE_BATCH_SIZE": "many"},
         "REDIS_LOCAL_CACHE_BATCH_SIZE='many'"),
        ({"DISK_PATH": "/var/lib/limitador"}, "DISK_PATH is set: the disk storage is not supported"),
        ({"DISK_OPTIMIZE": "disk"}, "DISK_OPTIMIZE is set: the disk storage is not supported"),
        ({"REDIS_LOCAL_CACHE_MAX_TTL_CACHED_COUNTERS_MS": "5000"}, "Limitador 2 no longer reads it"),
        ({"REDIS_LOCAL_CACHE_TTL_RATIO_CACHED_COUNTERS": "10"}, "Limitador 2 no longer reads it"),
        ({"REDIS_LOCAL_CACHE_SIZE": "10"}, "REDIS_LOCAL_CACHE_SIZE is not a Limitador setting"),
        ({"RUST_LOG": "info,limitador=loud"}, "environment variable RUST_LOG='info,limitador=loud'"),
        ({"RUST_LOG": "limitador=chatty"}, "directive 'limitador=chatty'"),
        ({"TRACING_ENDPOINT": "ftp://collector:21"}, "scheme must be http, https, rpc or grpc"),
    ],
)
def test_environment_settings_that_cannot_be_honoured_are_refused(
    env: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(["serve", "x.yaml"], capsys, env)


# -- logging, tracing, labels ----------------------------------------------------------------------


@pytest.mark.parametrize("value, level", [
    ("error", "error"), ("warn", "warning"), ("INFO", "info"), ("debug", "debug"), ("trace", "trace"),
    ("off", "off"), ("warn,limitador=debug", "debug"), ("limitador_server=info,tower=warn", "info"),
    ("limitador", "trace"),
])
def test_rust_log_sets_the_level_when_no_v_is_given(value: str, level: str) -> None:
    assert serve_config(["serve", "x.yaml"], {"RUST_LOG": value}).log_level == level
    assert serve_config(["serve", "x.yaml", "-vv"], {"RUST_LOG": value}).log_level == "info"


def test_limitador_options_for_logs_traces_and_labels() -> None:
    config = serve_config(["serve", "x.yaml", "--structured-logs", "--tracing-endpoint", "rpc://tempo:4317",
                           "--metric-labels-default", "descriptors[1]"])
    assert (config.structured_logs, config.tracing_endpoint, config.metric_labels_default) == (
        True, "rpc://tempo:4317", "descriptors[1]")
    assert serve_config(["serve", "x.yaml"], {"TRACING_ENDPOINT": "http://jaeger:4317"}).tracing_endpoint == (
        "http://jaeger:4317")


def test_bad_metric_labels_default_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--metric-labels-default" in usage_error(["serve", "x.yaml", "--metric-labels-default", "{'a':"], capsys)


@pytest.mark.parametrize("argv", [["-V"], ["--version"], ["serve", "--version"]])
def test_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_command(argv, {})
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("ratelimit ")


# -- limitador-server ------------------------------------------------------------------------------


def test_limitador_server_is_limitadors_command_line() -> None:
    """The operator's arguments: `limitador-server --http-port 8080 --rls-port 8081 FILE redis $(URL)`."""
    command = parse_command(
        ["--rate-limit-headers", "DRAFT_VERSION_03", "--limit-name-in-labels", "-vvv", "--http-port", "8080",
         "--rls-port", "8081", "--metric-labels-default", "descriptors[1]",
         "/home/limitador/etc/limitador-config.yaml", "redis", "redis://redis:6379"], {}, limitador=True)
    assert isinstance(command, Serve)
    assert (command.config.limits_file, command.config.storage, command.config.log_level) == (
        "/home/limitador/etc/limitador-config.yaml", "redis", "debug")


def test_limitador_server_requires_a_limits_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_command([], {}, limitador=True)
    assert exited.value.code == 2 and "LIMITS_FILE is required" in capsys.readouterr().err
    assert parse_command(["--validate"], {"LIMITS_FILE": "a.yaml"}, limitador=True) == Validate("a.yaml")


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


def test_no_arguments_with_limits_file_in_the_environment_serves() -> None:
    """`LIMITS_FILE=... ratelimit`, as a Limitador container is started."""
    config = serve_config([], {"LIMITS_FILE": "/env/limits.yaml", "REDIS_URL": "redis://redis:6379"})
    assert (config.limits_file, config.storage) == ("/env/limits.yaml", "redis")


def test_main_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES / "stacked.yaml")]) == 0
    assert "max_value: 500000" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("- namespace: a\n  max_value: 1\n")
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"{bad}:1" in captured.err and "seconds" in captured.err
