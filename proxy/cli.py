"""Command line: a thin layer over create_app and load_config; the only place errors become exit codes."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.config import load_config
from proxy.config_report import check_workers, config_warnings, render_config
from proxy.demo.cli import add_demo_parser, add_simulate_backend_parser
from proxy.errors import ConfigError
from proxy.server_http import PROTOCOL_PATH
from proxy.server_ws import WS_PROTOCOL_PATH

EXIT_CONFIG_ERROR = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# What uvicorn logs (at ERROR) when an app returns with its response unfinished. pollguard does
# that only on purpose — an upstream failing mid-body, a client that stopped reading — and logs
# why itself, so the server's line would only read as a bug.
_DELIBERATE_ABORT = "ASGI callable returned without completing response."


class DeliberateAbortFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _DELIBERATE_ABORT


def _log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"deliberate_abort": {"()": f"{__name__}.DeliberateAbortFilter"}}
    config["handlers"]["default"]["filters"] = ["deliberate_abort"]
    config["loggers"]["pollguard"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    path = args.config or os.environ.get("POLLGUARD_CONFIG")
    if not path:
        print(
            "pollguard serve: no config — pass --config PATH or set POLLGUARD_CONFIG",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    try:
        config = load_config(path)
        check_workers(config, args.workers)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for warning in config_warnings(config):
        print(f"pollguard: warning: {warning}", file=sys.stderr)
    # The factory (also used by `uvicorn --factory`) reads the path back from the environment,
    # which worker processes inherit.
    os.environ["POLLGUARD_CONFIG"] = os.path.abspath(path)
    uvicorn.run(
        "proxy.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=_log_config(args.log_level),
        access_log=False,
        # pollguard writes X-Forwarded-* itself, trusting only upstream.trusted_proxies.
        proxy_headers=False,
        # The upstream's Server and Date headers reach the client, not uvicorn's.
        server_header=False,
        date_header=False,
        # In-flight requests get this long after SIGTERM; then the rest are cancelled and
        # answered 503 shutting-down (when nothing was sent yet).
        timeout_graceful_shutdown=config.server.shutdown_timeout,  # type: ignore[arg-type]
        # uvicorn's httptools protocol with bounded request heads and no trailers as headers.
        http=PROTOCOL_PATH,
        # WebSockets: uvicorn's websockets protocol, closing with 1001 at shutdown. The client
        # side gets the upstream side's limits: the same largest message (larger: close 1009),
        # the same pings (a client that vanished is found within ping_interval + ping_timeout;
        # one that stopped reading, within server.send_timeout), and per-message-deflate when
        # the client offers it.
        ws=WS_PROTOCOL_PATH,
        ws_max_size=config.websocket.max_message_size,
        ws_ping_interval=config.websocket.ping_interval,
        ws_ping_timeout=config.websocket.ping_timeout,
        ws_per_message_deflate=True,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(render_config(config), end="")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollguard",
        description="Reverse proxy that ends endless 202 polling on stuck background jobs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pollguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the proxy under uvicorn",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--config", help="config file (default: $POLLGUARD_CONFIG)")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes (>1 needs state.redis_url)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level",
    )
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config", help="validate a config file and print the effective config"
    )
    check.add_argument("path", help="config file to check")
    check.set_defaults(func=_check_config)

    add_demo_parser(commands)
    add_simulate_backend_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
