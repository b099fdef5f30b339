"""The `demo` and `simulate-backend` subcommands; the top-level CLI registers them.

Heavy modules (uvicorn, httpx, starlette) are imported inside the commands so that registering
these subcommands costs `pollguard serve` nothing at startup."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from proxy.clihelp import DefaultsHelpFormatter
from proxy.demo.backend import Faults, SimulatorSettings, StuckJobs, WorkerMode
from proxy.demo.catalog import (
    DEFAULT_RECORDING_SIZE,
    TENANT_TOKENS,
    call_sid_for,
    unrecorded_call_sid,
)
from proxy.demo.scenarios import SCENARIOS, SIDE_BY_SIDE_SCENARIOS, Path

ALL_SCENARIOS = "all"
DEFAULT_SIMULATOR_PORT = 5000
# By hand, a download that takes a few seconds makes the 202 phase visible with curl.
STANDALONE_DOWNLOAD_SECONDS = 3.0
STANDALONE_RETRY_AFTER_SECONDS = 2
CALLS_LISTED_PER_TENANT = 3

if TYPE_CHECKING:  # argparse's class is subscriptable only for the type checker
    from proxy.demo.runner import DemoOptions

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def add_demo_parser(subparsers: Subparsers) -> None:
    """Register `demo`."""
    parser = subparsers.add_parser(
        "demo",
        formatter_class=DefaultsHelpFormatter,
        help="run pollguard in front of a simulated stuck backend and show the difference",
        description="Start the bundled legacy-backend simulator and pollguard (memory store, "
        "minutes compressed to seconds) on free loopback ports, run a polling "
        "client, print a timeline and a summary table. With no options: "
        f"{' and '.join(SIDE_BY_SIDE_SCENARIOS)}, with and without pollguard, side "
        "by side. Exit 0 when every run ended as promised.",
    )
    parser.add_argument(
        "--scenario",
        choices=[*SCENARIOS, ALL_SCENARIOS],
        default=None,
        help="run one scenario (or all) through pollguard only; default: the "
        "side-by-side comparison",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="run the scenario(s) with no proxy, showing the original bug",
    )
    parser.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        help="divide every guard duration by this (Retry-After stays >= 1s)",
    )
    parser.add_argument(
        "--old-client",
        action="store_true",
        help="use the old client: fixed delay between polls, Retry-After ignored",
    )
    parser.set_defaults(func=run_demo_command)


def demo_options(args: argparse.Namespace) -> DemoOptions:
    from proxy.demo.runner import DemoOptions

    if args.scenario is None:
        scenarios: tuple[str, ...] = SIDE_BY_SIDE_SCENARIOS
        paths = (Path.POLLGUARD, Path.DIRECT) if not args.direct else (Path.DIRECT,)
    else:
        scenarios = tuple(SCENARIOS) if args.scenario == ALL_SCENARIOS else (args.scenario,)
        paths = (Path.DIRECT,) if args.direct else (Path.POLLGUARD,)
    return DemoOptions(
        scenarios=scenarios, paths=paths, speed=args.speed, old_client=args.old_client
    )


def run_demo_command(args: argparse.Namespace) -> int:
    from proxy.demo.runner import run_demo

    return run_demo(demo_options(args))


def add_simulate_backend_parser(subparsers: Subparsers) -> None:
    """Register `simulate-backend`."""
    parser = subparsers.add_parser(
        "simulate-backend",
        formatter_class=DefaultsHelpFormatter,
        help="run the legacy recordings backend simulator (for trying configs by hand)",
        description="Serve a simulated legacy recordings API, stuck-queue bug included, with a "
        "WebSocket status feed per call at /api/recordings/{call_sid}/events. "
        "Counters: GET /_sim/counters; switch faults at run time: POST /_sim/faults "
        '{"worker_mode": "ok", "prepare_fails": false, "latency_ms": 0}.',
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_SIMULATOR_PORT, help="port")
    parser.add_argument(
        "--worker-mode",
        choices=[m.value for m in WorkerMode],
        default=WorkerMode.OK.value,
        help="how the download worker behaves",
    )
    parser.add_argument(
        "--download-seconds",
        type=_positive_float,
        default=STANDALONE_DOWNLOAD_SECONDS,
        help="how long a good job takes",
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        default=STANDALONE_RETRY_AFTER_SECONDS,
        help="Retry-After seconds on the backend's 202",
    )
    parser.add_argument(
        "--prepare-fails", action="store_true", help="the prepare endpoint answers 500"
    )
    parser.add_argument("--latency-ms", type=int, default=0, help="added to every request")
    parser.add_argument(
        "--stuck-for",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="start with every call's job created this long ago and stuck (e.g. 3600); 0: none",
    )
    parser.add_argument(
        "--stuck-jobs",
        choices=[kind.value for kind in StuckJobs],
        default=StuckJobs.QUEUED.value,
        help="how --stuck-for jobs look: never picked up, running since created, or running "
        "with no started_at",
    )
    parser.add_argument(
        "--recording-size", type=int, default=DEFAULT_RECORDING_SIZE, help="bytes per recording"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )
    parser.set_defaults(func=run_simulate_backend_command)


def simulator_settings(args: argparse.Namespace) -> SimulatorSettings:
    faults = Faults(
        worker_mode=WorkerMode(args.worker_mode),
        prepare_fails=args.prepare_fails,
        latency_seconds=args.latency_ms / 1000,
    )
    return SimulatorSettings(
        faults=faults,
        download_seconds=args.download_seconds,
        retry_after_seconds=args.retry_after,
        recording_size=args.recording_size,
        stuck_for=args.stuck_for,
        stuck_jobs=StuckJobs(args.stuck_jobs),
    )


def run_simulate_backend_command(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.demo.simulator import create_simulator
    from proxy.server_ws import WS_PROTOCOL_PATH

    simulator = create_simulator(
        simulator_settings(args),
        on_event=lambda sid, message: print(f"{sid} {message}", flush=True),
    )
    print(
        f"legacy recordings backend simulator on http://{args.host}:{args.port} "
        f"(worker {args.worker_mode})"
    )
    for token, tenant in TENANT_TOKENS.items():
        sids = ", ".join(call_sid_for(tenant, i) for i in range(CALLS_LISTED_PER_TENANT))
        print(f"  tenant {tenant}: Authorization: Bearer {token} (or Cookie: session={token})")
        print(f"    calls: {sids}, ... ; no recording: {unrecorded_call_sid(tenant)}")
    print(
        "  all calls: GET /_sim/calls; a call's live job status: WebSocket "
        "/api/recordings/<call_sid>/events",
        flush=True,
    )
    # pollguard's WebSocket server protocol: uvicorn's own logs an ERROR line for every feed
    # handshake the simulator refuses (401, 404).
    uvicorn.run(
        simulator.app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws=WS_PROTOCOL_PATH,
    )
    return 0
