"""`ratelimit`: Limitador's command line.

    ratelimit serve [OPTIONS] [LIMITS_FILE] [memory [-c N]]
    ratelimit validate [LIMITS_FILE]
    ratelimit translate FILE_OR_DIR...           (MaaS custom resources -> Limitador limits)
    ratelimit demo                               (the tier demo through a real Envoy)
    ratelimit [OPTIONS] LIMITS_FILE [memory]     (Limitador's own form, for drop-in images)

Options also come from Limitador's environment variables; the command line wins over the
environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from ratelimit import logs
from ratelimit.limits import LimitsError, dump_limits, load_limits_file
from ratelimit.metrics import MetricLabelsError, parse_default_labels
from ratelimit.server.app import RATE_LIMIT_HEADER_MODES, STORAGES, ServiceConfig, run_service
from ratelimit.server.errors import ServerError
from ratelimit.server.guards import DEFAULT_HEADER_TIMEOUT
from ratelimit.sources.limits_file import DEFAULT_INTERVAL
from ratelimit.sources.maas_naming import CatalogError
from ratelimit.storage.redis import DEFAULT_TIMEOUT
from ratelimit.storage.redis_cached import DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_PERIOD, DEFAULT_MAX_CACHED
from ratelimit.storage.redis_client import parse_url

T = TypeVar("T")

logger = logging.getLogger("ratelimit")

COMMANDS = ("serve", "validate", "translate", "demo")

# Limitador's storage words. Only those in STORAGES can be served; the others are recognised so that
# a Limitador command line gets a clear "not supported yet" rather than "no such file".
STORAGE_WORDS = ("memory", "disk", "redis", "redis_cached", "distributed")

# Served when no LIMITS_FILE is given to `ratelimit serve`: the tier demo, examples/tiers.yaml, shipped
# as package data (a symlink in the checkout, a copy in a built wheel). `limitador-server` has no default.
DEFAULT_LIMITS_FILE = Path(__file__).resolve().parent / "default_limits.yaml"

# Limitador settings this service cannot honour: refused at start rather than ignored.
_DISK_REFUSAL = "the disk storage is not supported; use memory, redis or redis_cached"
_GONE_REFUSAL = ("is in Limitador's configuration docs but Limitador 2 no longer reads it (its redis_cached cache "
                 "has no TTL-based expiry) and neither does this service; remove it")
REFUSED_VARIABLES = {
    "DISK_PATH": _DISK_REFUSAL,
    "DISK_OPTIMIZE": _DISK_REFUSAL,
    "REDIS_LOCAL_CACHE_MAX_TTL_CACHED_COUNTERS_MS": _GONE_REFUSAL,
    "REDIS_LOCAL_CACHE_TTL_RATIO_CACHED_COUNTERS": _GONE_REFUSAL,
}
_CACHE_VARIABLES = ("REDIS_LOCAL_CACHE_ENABLED", "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS", "REDIS_LOCAL_CACHE_BATCH_SIZE")

ENVIRONMENT_HELP = """\
environment variables (the command line overrides them), Limitador's:
  LIMITS_FILE                          LIMITS_FILE
  HTTP_API_HOST, HTTP_API_PORT         -B/--http-ip, -P/--http-port
  ENVOY_RLS_HOST, ENVOY_RLS_PORT       -b/--rls-ip, -p/--rls-port
  RATE_LIMIT_HEADERS                   -H/--rate-limit-headers
  LIMIT_NAME_IN_PROMETHEUS_LABELS=1    -l/--limit-name-in-labels
  TRACING_ENDPOINT                     --tracing-endpoint
  RUST_LOG                             -v (its most verbose level, e.g. `info` or `limitador=debug`)
  REDIS_URL                            storage `redis URL` when no STORAGE is given (and the URL of
                                       `redis` / `redis_cached` given without one)
  REDIS_LOCAL_CACHE_ENABLED=1          with REDIS_URL: `redis_cached URL` instead
  REDIS_LOCAL_CACHE_BATCH_SIZE         redis_cached --batch-size
  REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS redis_cached --flush-period
and this service's own:
  RATELIMIT_API_TOKEN                  --api-token (prefer the variable: arguments show in `ps`)
  RATELIMIT_RELOAD_INTERVAL            --reload-interval
  RATELIMIT_HTTP_MAX_CONNECTIONS       --http-max-connections
  RATELIMIT_HTTP_HEADER_TIMEOUT        --http-header-timeout
  RATELIMIT_WORKERS                    --workers
Refused at start: DISK_PATH, DISK_OPTIMIZE (no disk storage), REDIS_LOCAL_CACHE_MAX_TTL_CACHED_COUNTERS_MS and
REDIS_LOCAL_CACHE_TTL_RATIO_CACHED_COUNTERS (no longer read by Limitador either).
"""


def version() -> str:
    try:
        number = metadata.version("ratelimit")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        number = "unknown"
    return f"ratelimit {number} (Limitador-compatible)"


@dataclass(frozen=True)
class Validate:
    """`ratelimit validate FILE` or `serve --validate`: print the normalized limits and exit."""

    limits_file: str


@dataclass(frozen=True)
class Translate:
    """`ratelimit translate FILE_OR_DIR...`: print the limits MaaS custom resources give Limitador."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class Demo:
    """`ratelimit demo`: the tier demo's four acts through a real Envoy (ratelimit.demo)."""


@dataclass(frozen=True)
class Serve:
    config: ServiceConfig
    used_default_limits: bool
    notices: tuple[str, ...] = ()
    """Settings the command line overrode, logged at start (Limitador overrides them silently)."""


# -- value parsers: shared by the command line and the environment --------------------------------


def _number(text: str, kind: Callable[[str], T]) -> T:
    """`kind` is int or float."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None


def _port(text: str) -> int:
    port = _number(text, int)
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return port


def _header_mode(text: str) -> str:
    if text not in RATE_LIMIT_HEADER_MODES:
        raise ValueError(f"must be one of {', '.join(RATE_LIMIT_HEADER_MODES)}, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a finite number more than 0, got {text}")
    return value


def _flag(text: str) -> bool:
    """Limitador's boolean variables: only "1" turns them on there, so anything but "1" or "0" is
    refused rather than read the way Limitador would silently read it (as off)."""
    value = text.strip()
    if value not in ("0", "1"):
        raise ValueError("set it to 1 to enable (or 0); Limitador reads only \"1\" as enabled")
    return value == "1"


def _tracing_endpoint(text: str) -> str:
    from ratelimit.server.tracing import parse_endpoint  # opentelemetry itself is imported only when used

    parse_endpoint(text)
    return text


def _argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type that reports the parser's own message instead of 'invalid value'."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.strip("_")
    return convert


# -- parsers ----------------------------------------------------------------------------------------


def _limits_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "limits_file", nargs="?", metavar="LIMITS_FILE",
        help=f"Limitador limits YAML (env LIMITS_FILE; default: the example {DEFAULT_LIMITS_FILE.name})",
    )


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help) and one parser per command."""
    parser = argparse.ArgumentParser(
        prog="ratelimit",
        description="Limitador-compatible token rate-limiting service.",
        epilog="Without a command, arguments are read as `serve` ones (Limitador's command line).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser(
        "serve", help="run the HTTP API (and the gRPC servers) with hot-reloaded limits",
        usage="%(prog)s [OPTIONS] [LIMITS_FILE] [memory [-c N] | redis URL | redis_cached URL [--batch-size N] "
              "[--flush-period MS] [--max-cached N]]", epilog=ENVIRONMENT_HELP, formatter_class=formatter,
    )
    _limits_file_argument(serve)
    serve.add_argument(
        "storage", nargs="*", metavar="STORAGE",
        help="memory (default), redis URL or redis_cached URL (URL: redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://, "
             "unix://, redis-cluster://NODE, any node of the cluster). Recognised, not supported yet: disk, distributed",
    )
    serve.add_argument("-B", "--http-ip", metavar="IP", help="HTTP API address (env HTTP_API_HOST; default 0.0.0.0)")
    serve.add_argument("-P", "--http-port", metavar="PORT", type=_argument_type(_port),
                       help="HTTP API port (env HTTP_API_PORT; default 8080)")
    serve.add_argument("-b", "--rls-ip", metavar="IP", help="gRPC address (env ENVOY_RLS_HOST; default 0.0.0.0)")
    serve.add_argument("-p", "--rls-port", metavar="PORT", type=_argument_type(_port),
                       help="gRPC port (env ENVOY_RLS_PORT; default 8081)")
    serve.add_argument("--grpc-reflection-service", action="store_true",
                       help="register gRPC server reflection (for grpcurl and similar tools)")
    serve.add_argument("-H", "--rate-limit-headers", metavar="MODE", type=_argument_type(_header_mode),
                       help="NONE or DRAFT_VERSION_03 (env RATE_LIMIT_HEADERS; default NONE)")
    serve.add_argument("-l", "--limit-name-in-labels", action="store_const", const=True,
                       help="add limit_name to the call and hit metrics (env LIMIT_NAME_IN_PROMETHEUS_LABELS=1)")
    serve.add_argument("-L", "--custom-metric-labels", metavar="FILE",
                       help="YAML map of metric label -> CEL expression over descriptors, e.g. "
                            "`user: descriptors[0]['user']`")
    serve.add_argument("--metrics-total-suffix", action="store_true",
                       help="name counters <name>_total (OpenMetrics style) instead of Limitador's bare names")
    serve.add_argument("--quota-metrics", action="store_true",
                       help="serve quota gauges (limit, used, remaining, reset per counter) on /metrics")
    serve.add_argument("--model-catalog", metavar="FILE", action="append", default=[],
                       help="ExternalModel / MaaSModelRef / LLMInferenceService YAML or a models file, "
                            "for the ratelimit_model_info series (repeatable)")
    serve.add_argument("--api-token", metavar="TOKEN",
                       help="require `Authorization: Bearer TOKEN` on the HTTP API but /status and /metrics "
                            "(env RATELIMIT_API_TOKEN)")
    serve.add_argument("--openai-errors", action="store_true",
                       help="answer OVER_LIMIT with an OpenAI-shaped JSON error and Retry-After, which Envoy's "
                            "rate-limit filter sends in its 429 (the ext_proc token meter always does)")
    serve.add_argument("--ext-proc-config", metavar="FILE",
                       help="YAML: how the ext_proc token meter maps requests to namespace, descriptors and "
                            "cost (examples/envoy/README.md); default: x-user-id / MaaS headers, model from the body")
    serve.add_argument("-c", "--cache", metavar="N", type=_argument_type(_positive_int),
                       help="memory storage: at most N counters")
    serve.add_argument("--on-storage-error", metavar="MODE", choices=("open", "closed"), default="closed",
                       help="when Redis cannot answer: closed (default) answers HTTP 503 / gRPC UNAVAILABLE, "
                            "open admits the request")
    serve.add_argument("--response-timeout", metavar="MS", type=_argument_type(_positive_int),
                       help=f"redis, redis_cached: longest wait for Redis (default {round(DEFAULT_TIMEOUT * 1000)})")
    serve.add_argument("--batch-size", metavar="N", type=_argument_type(_positive_int),
                       help=f"redis_cached: counters written per flush (default {DEFAULT_BATCH_SIZE})")
    serve.add_argument("--flush-period", metavar="MS", type=_argument_type(_positive_int),
                       help=f"redis_cached: how often counters are written (default {round(DEFAULT_FLUSH_PERIOD * 1000)})")
    serve.add_argument("--max-cached", metavar="N", type=_argument_type(_positive_int),
                       help=f"redis_cached: counters kept locally (default {DEFAULT_MAX_CACHED})")
    serve.add_argument("--reload-interval", metavar="SECONDS", type=_argument_type(_positive_float),
                       help=f"how often the limits file is checked (env RATELIMIT_RELOAD_INTERVAL; "
                            f"default {DEFAULT_INTERVAL:g})")
    serve.add_argument("--http-max-connections", metavar="N", type=_argument_type(_positive_int),
                       help="open HTTP connections allowed; at the cap the longest-idle one is closed "
                            "(env RATELIMIT_HTTP_MAX_CONNECTIONS; default: what the open-file limit leaves, "
                            "at most 10000)")
    serve.add_argument("--http-header-timeout", metavar="SECONDS", type=_argument_type(_positive_float),
                       help="seconds a client may take to send a request head, then 408 "
                            f"(env RATELIMIT_HTTP_HEADER_TIMEOUT; default {DEFAULT_HEADER_TIMEOUT:g})")
    serve.add_argument("--metric-labels-default", metavar="EXPR",
                       help="CEL expression over descriptors giving a map of metric labels, e.g. `descriptors[1]`; "
                            "the -L labels win over its entries")
    serve.add_argument("--tracing-endpoint", metavar="URL", type=_argument_type(_tracing_endpoint),
                       help="export a span per decision over OTLP/gRPC to URL, e.g. http://collector:4317 "
                            "(env TRACING_ENDPOINT; default: off)")
    serve.add_argument("--workers", metavar="N|auto", type=_argument_type(_workers),
                       help="processes serving the same ports and one shared memory table (env RATELIMIT_WORKERS; "
                            "auto: the usable cores; default 1)")
    serve.add_argument("-v", dest="verbosity", action="count", default=0,
                       help="more logging: -v warnings, -vv info, -vvv debug, -vvvv trace (default: errors, "
                            "or RUST_LOG's level)")
    serve.add_argument("--structured-logs", action="store_true", help="log JSON lines (one object per line)")
    serve.add_argument("-V", "--version", action="version", version=version())
    serve.add_argument("--validate", action="store_true",
                       help="print the normalized limits and exit: 0 if valid, 1 if not")
    serve.add_argument("--maas", metavar="DIR",
                       help="serve the limits translated from MaaS custom resources in DIR (instead of LIMITS_FILE), "
                            "hot-reloaded like a limits file; see `ratelimit translate`")

    validate = commands.add_parser(
        "validate", help="check a limits file and print it normalized (exit 1 on error)",
        description="Parse LIMITS_FILE, print its limits as normalized YAML and exit 0, "
                    "or print the error (file, line, field) and exit 1.",
    )
    _limits_file_argument(validate)

    translate = commands.add_parser(
        "translate", help="print the Limitador limits that MaaS custom resources give (exit 1 on error)",
        description="Read MaaSSubscription, MaaSAuthPolicy, MaaSModelRef, ExternalModel, LLMInferenceService, Secret "
                    "and Kuadrant TokenRateLimitPolicy documents (multi-document YAML files, directories) and print "
                    "the limits maas-controller and Kuadrant would give Limitador. Lint warnings go to stderr.",
    )
    translate.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    demo = commands.add_parser(
        "demo", help="play the freemium / pro / premium tier demo through a real Envoy (needs a checkout)",
        description="Start `serve --maas examples/maas`, an OpenAI-compatible upstream and Envoy, play the tier "
                    "demo's four acts and show the counters.",
    )
    return parser, {"serve": serve, "validate": validate, "translate": translate, "demo": demo}


def parse_command(
    argv: Sequence[str], env: Mapping[str, str], limitador: bool = False
) -> Serve | Validate | Translate | Demo:
    """What to do. Usage errors exit 2 through argparse, with the usage line.

    `limitador=True` is the `limitador-server` command: Limitador's command line only (no
    subcommands), and LIMITS_FILE is required as there, with no example limits to fall back on.
    """
    parser, commands = build_parsers()
    if limitador:
        command, rest = "serve", list(argv)
        commands["serve"].prog = "limitador-server"
    else:
        if not argv and env.get("LIMITS_FILE"):
            argv = ["serve"]  # `LIMITS_FILE=... ratelimit`, as a Limitador image is started
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help(sys.stderr if not argv else sys.stdout)
            raise SystemExit(2 if not argv else 0)
        command, rest = (argv[0], list(argv[1:])) if argv[0] in COMMANDS else ("serve", list(argv))
    sub = commands[command]
    # Intermixed parsing lets options sit anywhere, e.g. `serve limits.yaml memory -c 100 -vv`.
    args = sub.parse_intermixed_args(rest)
    if command == "translate":
        return Translate(tuple(args.paths))
    if command == "demo":
        return Demo()
    storage = getattr(args, "storage", [])
    if args.limits_file in STORAGE_WORDS:
        # `serve memory -c 100` with LIMITS_FILE from the environment: the word is the storage.
        storage = [args.limits_file, *storage]
        args.limits_file = None

    def setting(value: T | None, name: str, parse: Callable[[str], T], default: T) -> T:
        return _env_setting(sub, env, value, name, parse, default)

    limits_file = setting(args.limits_file, "LIMITS_FILE", str, "")
    maas_dir = getattr(args, "maas", None)
    if maas_dir is not None:
        if args.limits_file or args.validate:
            sub.error("--maas DIR replaces LIMITS_FILE and --validate (check DIR with `ratelimit translate DIR`)")
        limits_file = maas_dir
    used_default = not limits_file
    if used_default:
        if limitador:
            sub.error("LIMITS_FILE is required (as an argument or the LIMITS_FILE environment variable)")
        if not DEFAULT_LIMITS_FILE.is_file():
            sub.error(f"LIMITS_FILE is required (the embedded default {DEFAULT_LIMITS_FILE} is missing)")
        limits_file = str(DEFAULT_LIMITS_FILE)
    if command == "validate" or args.validate:
        return Validate(limits_file)

    for name, reason in REFUSED_VARIABLES.items():
        if env.get(name, "") != "":
            sub.error(f"environment variable {name} is set: {reason}")
    unknown_cache = sorted(name for name in env if name.startswith("REDIS_LOCAL_CACHE_")
                           and name not in _CACHE_VARIABLES and name not in REFUSED_VARIABLES)
    if unknown_cache:
        sub.error(f"environment variable {unknown_cache[0]} is not a Limitador setting "
                  f"(known: {', '.join(_CACHE_VARIABLES)})")
    notices: list[str] = []
    storage_name, storage_url, cache = _storage(sub, storage, args, env, notices)
    if args.metric_labels_default is not None:
        try:
            parse_default_labels(args.metric_labels_default)
        except MetricLabelsError as exc:
            sub.error(str(exc))
    if args.verbosity:
        log_level = logs.verbosity_level(args.verbosity)
    else:
        log_level = setting(None, "RUST_LOG", logs.rust_log_level, "error")
    config = ServiceConfig(
        limits_file=limits_file,
        maas=maas_dir is not None,
        http_ip=setting(args.http_ip, "HTTP_API_HOST", str, "0.0.0.0"),
        http_port=setting(args.http_port, "HTTP_API_PORT", _port, 8080),
        rls_ip=setting(args.rls_ip, "ENVOY_RLS_HOST", str, "0.0.0.0"),
        rls_port=setting(args.rls_port, "ENVOY_RLS_PORT", _port, 8081),
        grpc_reflection=args.grpc_reflection_service,
        storage=storage_name,
        cache_size=args.cache,
        storage_url=storage_url,
        on_storage_error=args.on_storage_error,
        response_timeout=(args.response_timeout or round(DEFAULT_TIMEOUT * 1000)) / 1000,
        batch_size=cache.batch_size,
        flush_period=cache.flush_period_ms / 1000,
        max_cached=args.max_cached or DEFAULT_MAX_CACHED,
        rate_limit_headers=setting(args.rate_limit_headers, "RATE_LIMIT_HEADERS", _header_mode, "NONE"),
        limit_name_in_labels=setting(args.limit_name_in_labels, "LIMIT_NAME_IN_PROMETHEUS_LABELS", _flag, False),
        custom_metric_labels=args.custom_metric_labels,
        metric_labels_default=args.metric_labels_default,
        metrics_total_suffix=args.metrics_total_suffix,
        quota_metrics=args.quota_metrics,
        model_catalog=tuple(args.model_catalog),
        api_token=setting(args.api_token, "RATELIMIT_API_TOKEN", str, None),
        openai_errors=args.openai_errors,
        ext_proc_config=args.ext_proc_config,
        log_level=log_level,
        structured_logs=args.structured_logs,
        tracing_endpoint=setting(args.tracing_endpoint, "TRACING_ENDPOINT", _tracing_endpoint, ""),
        reload_interval=setting(args.reload_interval, "RATELIMIT_RELOAD_INTERVAL", _positive_float, DEFAULT_INTERVAL),
        workers=setting(args.workers, "RATELIMIT_WORKERS", _workers, 1),
        http_max_connections=setting(args.http_max_connections, "RATELIMIT_HTTP_MAX_CONNECTIONS", _positive_int, None),
        http_header_timeout=setting(
            args.http_header_timeout, "RATELIMIT_HTTP_HEADER_TIMEOUT", _positive_float, DEFAULT_HEADER_TIMEOUT
        ),
    )
    return Serve(config, used_default, tuple(notices))


def _env_setting(
    parser: argparse.ArgumentParser, env: Mapping[str, str], value: T | None, name: str, parse: Callable[[str], T],
    default: T,
) -> T:
    """The command line's value, else the environment variable's (parsed), else the default."""
    if value is not None:
        return value
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        parser.error(f"environment variable {name}={raw!r}: {exc}")


@dataclass(frozen=True)
class _CacheSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_period_ms: int = round(DEFAULT_FLUSH_PERIOD * 1000)


def _storage(
    parser: argparse.ArgumentParser, words: Sequence[str], args: argparse.Namespace, env: Mapping[str, str],
    notices: list[str],
) -> tuple[str, str | None, _CacheSettings]:
    """The storage, its URL and the redis_cached settings, from `[memory]`, `redis URL`,
    `redis_cached URL` or, as Limitador does when no storage is named, from REDIS_URL (+
    REDIS_LOCAL_CACHE_ENABLED=1 for redis_cached)."""
    env_url = env.get("REDIS_URL", "")
    cache_enabled = _env_setting(parser, env, None, "REDIS_LOCAL_CACHE_ENABLED", _flag, False)
    cache_variables = [name for name in _CACHE_VARIABLES[1:] if env.get(name, "") != ""]
    if words:
        name, *rest = words
        from_environment = False
    elif env_url:
        name, rest, from_environment = ("redis_cached" if cache_enabled else "redis"), [env_url], True
    else:
        if cache_enabled or cache_variables:
            parser.error(f"environment variable {'REDIS_LOCAL_CACHE_ENABLED' if cache_enabled else cache_variables[0]} "
                         "needs REDIS_URL (or name the storage: `redis_cached URL`)")
        name, rest, from_environment = "memory", [], True
    if name not in STORAGE_WORDS:
        parser.error(f"unknown storage {name!r}; expected one of {', '.join(STORAGE_WORDS)}")
    if name not in STORAGES:
        parser.error(f"storage {name!r} is not supported yet; use {' or '.join(STORAGES)}")
    if not from_environment:
        if env_url and name == "memory":
            notices.append("REDIS_URL is set, but the command line names the memory storage: counters stay in "
                           "this process")
        if cache_enabled and name != "redis_cached":
            notices.append(f"REDIS_LOCAL_CACHE_ENABLED=1 is set, but the command line names the {name} storage")
    if cache_variables and name != "redis_cached":
        if from_environment:
            parser.error(f"environment variable {cache_variables[0]} only applies with REDIS_LOCAL_CACHE_ENABLED=1")
        notices.append(f"{', '.join(cache_variables)} only apply to redis_cached, not to the {name} storage")
    cached_only = [flag for flag, value in (("--batch-size", args.batch_size), ("--flush-period", args.flush_period),
                                            ("--max-cached", args.max_cached)) if value is not None]
    if name != "redis_cached" and cached_only:
        parser.error(f"{', '.join(cached_only)} only apply to redis_cached")
    if name == "memory":
        if args.response_timeout is not None:
            parser.error("--response-timeout only applies to redis and redis_cached")
        if rest:
            parser.error(f"unexpected arguments after {name!r}: {' '.join(rest)}")
        return name, None, _CacheSettings()
    if not rest and env_url:
        rest = [env_url]  # `redis` / `redis_cached` without a URL: Limitador's default is REDIS_URL
    if len(rest) != 1:
        parser.error(f"{name} needs exactly one URL, e.g. `{name} redis://127.0.0.1:6379` (or REDIS_URL)")
    try:
        parse_url(rest[0])
    except ValueError as exc:
        source = "environment variable REDIS_URL" if rest[0] == env_url else f"{name} URL"
        parser.error(f"{source}: {exc}")
    cache = _CacheSettings(
        batch_size=_env_setting(parser, env, args.batch_size, "REDIS_LOCAL_CACHE_BATCH_SIZE", _positive_int,
                                DEFAULT_BATCH_SIZE),
        flush_period_ms=_env_setting(parser, env, args.flush_period, "REDIS_LOCAL_CACHE_FLUSHING_PERIOD_MS",
                                     _positive_int, round(DEFAULT_FLUSH_PERIOD * 1000)),
    ) if name == "redis_cached" else _CacheSettings()
    return name, rest[0], cache


# -- commands ---------------------------------------------------------------------------------------


def validate(limits_file: str) -> int:
    try:
        limits = load_limits_file(limits_file)
    except LimitsError as exc:
        print(f"invalid limits file: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_limits(limits))
    return 0


def translate(paths: Sequence[str]) -> int:
    # Imported here: only this command needs the MaaS translation (and the exporter's catalog).
    from ratelimit.sources.maas import translate_paths

    try:
        translation = translate_paths(paths)
    except LimitsError as exc:
        print(f"cannot translate: {exc}", file=sys.stderr)
        return 1
    for warning in translation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(dump_limits(translation.limits))
    return 0


def _workers(text: str) -> int:
    if text == "auto":
        return len(os.sched_getaffinity(0))
    return _positive_int(text)


def serve(command: Serve) -> int:
    config = command.config
    logs.configure_logging(config.log_level, config.structured_logs)
    logs.STARTUP.info("%s", version())
    if command.used_default_limits:
        # Said whatever the log level: nobody should be surprised by which limits apply.
        logs.STARTUP.warning("no LIMITS_FILE given, serving the example %s", config.limits_file)
    for notice in command.notices:
        logs.STARTUP.warning("%s", notice)
    try:
        if config.workers > 1:
            from ratelimit.server.workers import run_workers

            return run_workers(config, config.workers)
        asyncio.run(run_service(config))
    except LimitsError as exc:
        logger.error("cannot start, invalid limits file: %s", exc)
        return 1
    except ServerError as exc:
        logger.error("%s", exc)
        return 1
    except (MetricLabelsError, CatalogError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`ratelimit`: the commands above, or Limitador's command line without one."""
    command = parse_command(sys.argv[1:] if argv is None else argv, os.environ)
    if isinstance(command, Validate):
        return validate(command.limits_file)
    if isinstance(command, Translate):
        return translate(command.paths)
    if isinstance(command, Demo):
        from ratelimit.demo import main as demo  # starts Envoy: imported only for this command

        return demo()
    return serve(command)


def limitador_main(argv: Sequence[str] | None = None) -> int:
    """`limitador-server`: Limitador's command line exactly, for images and operators that run
    `limitador-server [OPTIONS] LIMITS_FILE [STORAGE]` (the limitador-operator does)."""
    command = parse_command(sys.argv[1:] if argv is None else argv, os.environ, limitador=True)
    if isinstance(command, Validate):
        return validate(command.limits_file)
    assert isinstance(command, Serve)
    return serve(command)


if __name__ == "__main__":
    sys.exit(main())
