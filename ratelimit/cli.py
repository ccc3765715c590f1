"""`ratelimit`: Limitador's command line.

    ratelimit serve [OPTIONS] [LIMITS_FILE] [memory [-c N]]
    ratelimit validate [LIMITS_FILE]
    ratelimit translate FILE_OR_DIR...           (MaaS custom resources -> Limitador limits)
    ratelimit demo                               (the seed's tier demo through a real Envoy)
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
from pathlib import Path
from typing import TypeVar

from exporter.catalog import CatalogError
from ratelimit.limits import LimitsError, dump_limits, load_limits_file
from ratelimit.metrics import MetricLabelsError
from ratelimit.server.app import RATE_LIMIT_HEADER_MODES, STORAGES, ServiceConfig, ServerError, run_service
from ratelimit.server.guards import DEFAULT_HEADER_TIMEOUT
from ratelimit.sources.limits_file import DEFAULT_INTERVAL
from ratelimit.storage.redis import DEFAULT_TIMEOUT
from ratelimit.storage.redis_cached import DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_PERIOD, DEFAULT_MAX_CACHED
from ratelimit.storage.redis_client import parse_url

T = TypeVar("T")

COMMANDS = ("serve", "validate", "translate", "demo")

# Limitador's storage words. Only those in STORAGES can be served; the others are recognised so that
# a Limitador command line gets a clear "not supported yet" rather than "no such file".
STORAGE_WORDS = ("memory", "disk", "redis", "redis_cached", "distributed")

# `-v` count -> log level, as Limitador maps it (no -v: errors only; -vvvv: trace).
LOG_LEVELS = ("error", "warning", "info", "debug", "trace")

# Served when no LIMITS_FILE is given: the tier demo, examples/tiers.yaml, shipped as package data
# (a symlink in the checkout, a copy in a built wheel).
DEFAULT_LIMITS_FILE = Path(__file__).resolve().parent / "default_limits.yaml"

ENVIRONMENT_HELP = """\
environment variables (the command line overrides them):
  LIMITS_FILE                          LIMITS_FILE
  HTTP_API_HOST, HTTP_API_PORT         -B/--http-ip, -P/--http-port
  ENVOY_RLS_HOST, ENVOY_RLS_PORT       -b/--rls-ip, -p/--rls-port
  RATE_LIMIT_HEADERS                   -H/--rate-limit-headers
  LIMIT_NAME_IN_PROMETHEUS_LABELS=1    -l/--limit-name-in-labels
  RATELIMIT_API_TOKEN                  --api-token (prefer the variable: arguments show in `ps`)
  RATELIMIT_RELOAD_INTERVAL            --reload-interval
  RATELIMIT_HTTP_MAX_CONNECTIONS       --http-max-connections
  RATELIMIT_HTTP_HEADER_TIMEOUT        --http-header-timeout
"""


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
    """`ratelimit demo`: the seed's four acts through a real Envoy (ratelimit.demo)."""


@dataclass(frozen=True)
class Serve:
    config: ServiceConfig
    used_default_limits: bool


# -- value parsers: shared by the command line and the environment --------------------------------


def _number(text: str, kind: type[T]) -> T:
    try:
        return kind(text)  # type: ignore[call-arg]
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
    return text.strip().lower() in ("1", "true", "yes", "on")


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
             "unix://, redis-cluster://SEED). Recognised, not supported yet: disk, distributed",
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
    serve.add_argument("-v", dest="verbosity", action="count", default=0,
                       help="more logging: -v warnings, -vv info, -vvv debug, -vvvv trace")
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
        "demo", help="play the seed's freemium / pro / premium demo through a real Envoy (needs a checkout)",
        description="Start `serve --maas examples/maas`, an OpenAI-compatible upstream and Envoy, play seed 003 "
                    "section 10.2 Acts 1-4 and show the counters.",
    )
    return parser, {"serve": serve, "validate": validate, "translate": translate, "demo": demo}


def parse_command(argv: Sequence[str], env: Mapping[str, str]) -> Serve | Validate | Translate | Demo:
    """What to do. Usage errors exit 2 through argparse, with the usage line."""
    parser, commands = build_parsers()
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
        if value is not None:
            return value
        raw = env.get(name, "")
        if raw == "":
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            sub.error(f"environment variable {name}={raw!r}: {exc}")

    limits_file = setting(args.limits_file, "LIMITS_FILE", str, "")
    maas_dir = getattr(args, "maas", None)
    if maas_dir is not None:
        if args.limits_file or args.validate:
            sub.error("--maas DIR replaces LIMITS_FILE and --validate (check DIR with `ratelimit translate DIR`)")
        limits_file = maas_dir
    used_default = not limits_file
    if used_default:
        if not DEFAULT_LIMITS_FILE.is_file():
            sub.error(f"LIMITS_FILE is required (the embedded default {DEFAULT_LIMITS_FILE} is missing)")
        limits_file = str(DEFAULT_LIMITS_FILE)
    if command == "validate" or args.validate:
        return Validate(limits_file)

    storage_name, storage_url = _storage(sub, storage, args)
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
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        flush_period=(args.flush_period or round(DEFAULT_FLUSH_PERIOD * 1000)) / 1000,
        max_cached=args.max_cached or DEFAULT_MAX_CACHED,
        rate_limit_headers=setting(args.rate_limit_headers, "RATE_LIMIT_HEADERS", _header_mode, "NONE"),
        limit_name_in_labels=setting(args.limit_name_in_labels, "LIMIT_NAME_IN_PROMETHEUS_LABELS", _flag, False),
        custom_metric_labels=args.custom_metric_labels,
        metrics_total_suffix=args.metrics_total_suffix,
        quota_metrics=args.quota_metrics,
        model_catalog=tuple(args.model_catalog),
        api_token=setting(args.api_token, "RATELIMIT_API_TOKEN", str, None),
        openai_errors=args.openai_errors,
        ext_proc_config=args.ext_proc_config,
        log_level=LOG_LEVELS[min(args.verbosity, len(LOG_LEVELS) - 1)],
        reload_interval=setting(args.reload_interval, "RATELIMIT_RELOAD_INTERVAL", _positive_float, DEFAULT_INTERVAL),
        http_max_connections=setting(args.http_max_connections, "RATELIMIT_HTTP_MAX_CONNECTIONS", _positive_int, None),
        http_header_timeout=setting(
            args.http_header_timeout, "RATELIMIT_HTTP_HEADER_TIMEOUT", _positive_float, DEFAULT_HEADER_TIMEOUT
        ),
    )
    return Serve(config, used_default)


def _storage(parser: argparse.ArgumentParser, words: Sequence[str], args: argparse.Namespace) -> tuple[str, str | None]:
    """The storage and its URL from `[memory]`, `redis URL` or `redis_cached URL`."""
    name, *rest = words or ["memory"]
    if name not in STORAGE_WORDS:
        parser.error(f"unknown storage {name!r}; expected one of {', '.join(STORAGE_WORDS)}")
    if name not in STORAGES:
        parser.error(f"storage {name!r} is not supported yet; use {' or '.join(STORAGES)}")
    cached_only = [flag for flag, value in (("--batch-size", args.batch_size), ("--flush-period", args.flush_period),
                                            ("--max-cached", args.max_cached)) if value is not None]
    if name != "redis_cached" and cached_only:
        parser.error(f"{', '.join(cached_only)} only apply to redis_cached")
    if name == "memory":
        if args.response_timeout is not None:
            parser.error("--response-timeout only applies to redis and redis_cached")
        if rest:
            parser.error(f"unexpected arguments after {name!r}: {' '.join(rest)}")
        return name, None
    if len(rest) != 1:
        parser.error(f"{name} needs exactly one URL, e.g. `{name} redis://127.0.0.1:6379`")
    try:
        parse_url(rest[0])
    except ValueError as exc:
        parser.error(f"{name} URL: {exc}")
    return name, rest[0]


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


def serve(command: Serve) -> int:
    level = command.config.log_level.upper()
    logging.basicConfig(
        level=logging.DEBUG if level == "TRACE" else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if command.used_default_limits:
        # Said on stderr whatever the log level: nobody should be surprised by which limits apply.
        print(f"ratelimit: no LIMITS_FILE given, serving the example {command.config.limits_file}", file=sys.stderr)
    try:
        asyncio.run(run_service(command.config))
    except LimitsError as exc:
        print(f"ratelimit: cannot start, invalid limits file: {exc}", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        return 1
    except (MetricLabelsError, CatalogError) as exc:
        print(f"ratelimit: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command(sys.argv[1:] if argv is None else argv, os.environ)
    if isinstance(command, Validate):
        return validate(command.limits_file)
    if isinstance(command, Translate):
        return translate(command.paths)
    if isinstance(command, Demo):
        from ratelimit.demo import main as demo  # starts Envoy: imported only for this command

        return demo()
    return serve(command)


if __name__ == "__main__":
    sys.exit(main())
