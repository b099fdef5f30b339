"""Command line: a thin layer over create_app and load_config; the only place errors become exit codes."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from proxy import __version__
from proxy.clihelp import DefaultsHelpFormatter
from proxy.config import (
    DEFAULT_HOST,
    DEFAULT_LOG_LEVEL,
    DEFAULT_PORT,
    DEFAULT_WORKERS,
    LOG_LEVELS,
    LoggingConfig,
    ServerConfig,
    WebSocketConfig,
    load_config,
)
from proxy.config_loading import translate_validation_error
from proxy.config_report import check_workers, config_warnings, render_config
from proxy.demo.cli import add_demo_parser, add_simulate_backend_parser
from proxy.errors import ConfigError
from proxy.healthcheck import check, probe_for
from proxy.jobs_cli import add_jobs_parser
from proxy.logformat import FORMATTERS
from proxy.server_http import PROTOCOL_PATH
from proxy.server_ws import WS_PROTOCOL_PATH
from proxy.sweep_cli import add_sweep_parser
from proxy.tls import uvicorn_ssl_options

EXIT_CONFIG_ERROR = 2
# `serve` flags that override the config's server section, each named as its field.
SERVER_FLAGS = ("host", "port", "workers", "log_level")
# What uvicorn logs (at ERROR) when an app returns with its response unfinished. pollguard does
# that only on purpose — an upstream failing mid-body, a client that stopped reading — and logs
# why itself, so the server's line would only read as a bug.
_DELIBERATE_ABORT = "ASGI callable returned without completing response."


class DeliberateAbortFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _DELIBERATE_ABORT


def _log_config(level: str, log_format: str = "text", access_buffer: int = 0) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    # uvicorn's lines and pollguard's alike, each with its time and level (logging.format).
    formatter = {"()": f"proxy.logformat.{FORMATTERS[log_format].__name__}"}
    config["formatters"] = {"default": formatter, "access": dict(formatter)}
    config["filters"] = {"deliberate_abort": {"()": f"{__name__}.DeliberateAbortFilter"}}
    config["handlers"]["default"]["filters"] = ["deliberate_abort"]
    config["loggers"]["pollguard"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    # Admin writes are logged whatever the log level: an audit trail must not be filtered out.
    config["loggers"]["pollguard.audit"] = {"level": "INFO"}
    # Access lines (logging.access) go to stdout at INFO whatever the log level: turning them
    # on is the choice, and other lines stay on stderr.
    config["handlers"]["access"] = {
        "formatter": "access",
        "()": "proxy.logformat.BufferedStreamHandler",
        "stream": "ext://sys.stdout",
        "buffer_bytes": access_buffer,
    }
    config["loggers"]["pollguard.access"] = {
        "handlers": ["access"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def _config_path(args: argparse.Namespace, command: str) -> str | None:
    """--config, else POLLGUARD_CONFIG; None (after saying so) when neither is given."""
    path: str | None = args.config or os.environ.get("POLLGUARD_CONFIG")
    if not path:
        print(
            f"pollguard {command}: no config — pass --config PATH or set POLLGUARD_CONFIG",
            file=sys.stderr,
        )
        return None
    return path


def _serve(args: argparse.Namespace) -> int:
    from proxy.supervisor import serve

    path = _config_path(args, "serve")
    if path is None:
        return EXIT_CONFIG_ERROR
    try:
        config = load_config(path)
        server = effective_server(config.server, args)
        check_workers(config, server.workers)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for warning in config_warnings(config):
        print(f"pollguard: warning: {warning}", file=sys.stderr)
    # The factory (also used by `uvicorn --factory`) reads the path back from the environment,
    # which worker processes inherit.
    os.environ["POLLGUARD_CONFIG"] = os.path.abspath(path)
    options = uvicorn_options(server, config.websocket, config.logging)
    serve("proxy.app:create_app", options)
    return 0


def effective_server(server: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    """The config's server section with the flags given on the command line put over it."""
    given = {name: value for name in SERVER_FLAGS if (value := getattr(args, name)) is not None}
    return server.model_copy(update=given)


def uvicorn_options(
    server: ServerConfig, websocket: WebSocketConfig, logs: LoggingConfig | None = None
) -> dict[str, Any]:
    """How `pollguard serve` runs uvicorn; README's plain `uvicorn --factory` line mirrors it."""
    tls = server.tls
    logs = logs or LoggingConfig()
    return {
        "host": server.host,
        "port": server.port,
        "workers": server.workers,
        "log_level": server.log_level,
        "log_config": _log_config(server.log_level, logs.format, logs.access_buffer),
        # pollguard writes its own access line (logging.access, proxy.request_log).
        "access_log": False,
        # pollguard writes X-Forwarded-* itself, trusting only upstream.trusted_proxies.
        "proxy_headers": False,
        # The upstream's Server and Date headers reach the client, not uvicorn's.
        "server_header": False,
        "date_header": False,
        # In-flight requests get this long after SIGTERM; then the rest are cancelled and
        # answered 503 shutting-down (when nothing was sent yet).
        "timeout_graceful_shutdown": server.shutdown_timeout,
        # uvicorn's httptools protocol with bounded request heads and no trailers as headers.
        "http": PROTOCOL_PATH,
        # HTTPS when server.tls has a certificate; scope["scheme"] is then "https", and so is
        # the X-Forwarded-Proto pollguard sends upstream.
        **uvicorn_ssl_options(tls.cert_file, tls.key_file, tls.ca_file),
        # WebSockets: uvicorn's websockets protocol, closing with 1001 at shutdown. The client
        # side gets the upstream side's limits: the same largest message (larger: close 1009),
        # the same pings (a client that vanished is found within ping_interval + ping_timeout;
        # one that stopped reading, within server.send_timeout), and per-message-deflate when
        # the client offers it.
        "ws": WS_PROTOCOL_PATH,
        "ws_max_size": websocket.max_message_size,
        "ws_ping_interval": websocket.ping_interval,
        "ws_ping_timeout": websocket.ping_timeout,
        "ws_per_message_deflate": True,
    }


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
        check_workers(config, config.server.workers)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(render_config(config), end="")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    path = _config_path(args, "healthcheck")
    if path is None:
        return EXIT_CONFIG_ERROR
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    server = effective_server(config.server, args)
    failure = check(probe_for(config.model_copy(update={"server": server})), args.timeout)
    if failure is not None:
        print(f"pollguard healthcheck: unhealthy: {failure}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollguard",
        description="Reverse proxy that ends endless 202 polling on stuck background jobs.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pollguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the proxy under uvicorn",
        description="Run pollguard: forward every request to upstream.url and guard the "
        "configured job routes. Settings come from the config file (server:, upstream:, "
        "state:, jobs:, routes:, websocket:); a flag given here overrides its server.* field. "
        "SIGTERM drains open requests for server.shutdown_timeout; SIGHUP reloads jobs: and "
        "routes: from the config file (every worker).",
    )
    serve.add_argument("--config", help="config file (default: $POLLGUARD_CONFIG)")
    # No argparse defaults: a flag left out takes the config's value, whose default is declared
    # once, on the config field.
    serve.add_argument(
        "--host",
        type=_server_setting("host"),
        help=f"address to listen on (default: server.host, else {DEFAULT_HOST})",
    )
    serve.add_argument(
        "--port",
        type=_server_setting("port"),
        help=f"port to listen on (default: server.port, else {DEFAULT_PORT})",
    )
    serve.add_argument(
        "--workers",
        type=_server_setting("workers"),
        help="worker processes, >1 needs a Redis store: state.redis_url or redis_mode "
        f"(default: server.workers, else {DEFAULT_WORKERS})",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help=f"log level (default: server.log_level, else {DEFAULT_LOG_LEVEL})",
    )
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a config file and print the effective config",
        description="Validate a config file as `serve` would load it (environment "
        "interpolation included) and print the effective config; exit 2 naming the field "
        "when it is invalid.",
    )
    check.add_argument("path", help="config file to check")
    check.set_defaults(func=_check_config)

    health = commands.add_parser(
        "healthcheck",
        help="exit 0 when the pollguard on this host answers its health endpoint",
        description="GET <admin.prefix>health where `serve` listens with the same config "
        "(server.host and server.port, or the --host/--port given to serve; 0.0.0.0 and :: "
        "are probed on loopback; https when server.tls is set, its certificate not checked). "
        "Exit 0 on 200, 1 otherwise, 2 for a bad config: for container HEALTHCHECKs and exec "
        "probes.",
    )
    health.add_argument("--config", help="config file (default: $POLLGUARD_CONFIG)")
    health.add_argument("--host", type=_server_setting("host"), help="as given to serve")
    health.add_argument("--port", type=_server_setting("port"), help="as given to serve")
    health.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=2.0,
        help="seconds to wait for the answer (default: 2)",
    )
    health.set_defaults(func=_healthcheck, workers=None, log_level=None)

    add_demo_parser(commands)
    add_simulate_backend_parser(commands)
    add_jobs_parser(commands)
    add_sweep_parser(commands)
    return parser


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < seconds <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text!r}")
    return seconds


def _server_setting(name: str) -> Callable[[str], object]:
    """An argparse type checking a flag exactly as the config checks `server.<name>`."""

    def parse(text: str) -> object:
        try:
            return getattr(ServerConfig.model_validate({name: text}), name)
        except ValidationError as exc:
            line = str(translate_validation_error(exc, ServerConfig, "", {})).splitlines()[0]
            raise argparse.ArgumentTypeError(line.split(": ", 2)[-1]) from None

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
