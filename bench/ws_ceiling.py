"""How fast can any WebSocket relay built on the `websockets` library go here? Echo round trips
through bench/apps/ws_ceiling_relay.py (both sides websockets sans-I/O from protocol callbacks,
nothing else), through asgiproxy and through pollguard, in one run, with the bench's WebSocket
load (bench/ws.py: 32 connections, one 64 B text message each in flight; relay pinned to the
proxy core, echo server and load generator to the load core).

Usage: bench/run --ws-ceiling [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import peers
import procs
import ws

WORK = peers.BENCH_DIR / ".work"
ROUNDS = 3


def _ceiling(tool_port: int, seconds: int) -> float:
    port = procs.free_port()
    argv = [sys.executable, str(peers.APPS_DIR / "ws_ceiling_relay.py"), str(port), str(tool_port)]
    relay = procs.start(procs.pinned(procs.PROXY_CORE, argv), log=WORK / "logs" / "ws-ceiling.log")
    try:
        procs.wait_for_port(port, relay)
        return _echo_rate(port, seconds)
    finally:
        procs.stop(relay)


def _echo_rate(port: int, seconds: int) -> float:
    tool = ws.build_tool(WORK)
    ws.wait_until_echoing(tool, port)
    ws._run_load(tool, port, ws.CONNECTIONS, ws.MESSAGE_BYTES, False, 0, 2)  # warm-up
    result = ws._run_load(tool, port, ws.CONNECTIONS, ws.MESSAGE_BYTES, False, 0, seconds)
    if ws._bad(result):
        raise RuntimeError(f"bad echoes through :{port}: {result}")
    return float(result["per_s"])


def _peer(name: str, ctx: peers.Context, echo_port: int, seconds: int) -> float:
    peer = next(p for p in peers.PEERS if p.name == name)
    running = peer.start(ctx.__class__(work=WORK, upstream_port=echo_port, redis_port=None))
    try:
        return _echo_rate(running.port, seconds)
    finally:
        if running.proc is not None:
            procs.stop(running.proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="seconds per measurement")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    procs.install_cleanup()
    tool = ws.build_tool(WORK)
    _echo, echo_port = ws.start_echo(WORK, tool)
    ctx = peers.Context(work=WORK, upstream_port=echo_port, redis_port=None)
    rates: dict[str, list[float]] = {"ceiling relay": [], "asgiproxy": [], "pollguard": []}
    try:
        for round_index in range(ROUNDS):
            rates["ceiling relay"].append(_ceiling(echo_port, args.seconds))
            for name in ("asgiproxy", "pollguard"):
                rates[name].append(_peer(name, ctx, echo_port, args.seconds))
            print(f"[ws-ceiling {time.strftime('%H:%M:%S')}] round {round_index + 1}/{ROUNDS}")
    finally:
        procs.stop_all()
    best_peer = statistics.median(rates["asgiproxy"])
    print("\n| relay | echo round trips/s (median of 3) | × asgiproxy |\n|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:,.0f} ({min(values):,.0f}–{max(values):,.0f}) | "
            f"{median / best_peer:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
