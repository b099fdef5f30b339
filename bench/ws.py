"""The WebSocket scenario (issue 9): echo round trips, 1 MiB messages, 1,000 idle WebSockets.

Upstream and load generator are bench/wsbench.c, built here with the system C compiler: an epoll
echo server and an epoll client, both pinned to the load core, so a Python proxy on the other
core is what limits each row (the direct row shows how far above the proxies that limit is).
The echo server negotiates no extension, so no peer compresses towards it; the load client
offers none either (it measures the relay, not zlib), while the idle client offers
per-message-deflate as browsers do, so the idle RSS includes what that costs a peer.

Every peer gets the same upstream: each is started a second time, for this scenario, with the
echo server as its upstream (the HTTP rows' nginx upstream cannot echo).
"""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import peers
import procs

SOURCE = peers.BENCH_DIR / "wsbench.c"
CONNECTIONS = 32  # as wrk's -c32: each connection has one small message in flight
MESSAGE_BYTES = 64  # text
BULK_BYTES = 1024 * 1024  # binary
BULK_CONNECTIONS = 4
IDLE_CONNECTIONS = 1000
IDLE_SETTLE_SECONDS = 1.0  # after the last handshake, before RSS is read
IDLE_TIMEOUT_SECONDS = 60.0
# After the idle WebSockets close, a peer may spend seconds tearing 1,000 of them down (one took
# ~3 s): the load runs wait until it uses under QUIET_CORES of a core, at most QUIET_TIMEOUT.
QUIET_CORES = 0.05
QUIET_WINDOW_SECONDS = 0.25
QUIET_TIMEOUT_SECONDS = 20.0
READY_TIMEOUT_SECONDS = 30.0
TOOL_SLACK_SECONDS = 30.0
PATH = "/echo"


def build_tool(work: Path) -> Path:
    """Compile wsbench.c into bench/.work (again only when the source changed)."""
    binary = work / "wsbench"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return binary


def start_echo(work: Path, tool: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = procs.free_port()
    argv = [str(tool), "echo", str(port)]
    proc = procs.start(procs.pinned(procs.LOAD_CORE, argv), log=work / "logs" / "ws-echo.log")
    procs.wait_for_port(port, proc)
    return proc, port


def _run_load(
    tool: Path, port: int, connections: int, size: int, binary: bool, warmup: float, seconds: float
) -> dict[str, Any]:
    argv = [
        str(tool),
        "load",
        str(port),
        PATH,
        str(connections),
        str(size),
        "1" if binary else "0",
        str(warmup),
        str(seconds),
    ]
    done = subprocess.run(
        procs.pinned(procs.LOAD_CORE, argv),
        capture_output=True,
        text=True,
        timeout=warmup + seconds + TOOL_SLACK_SECONDS,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _bad(result: dict[str, Any]) -> int:
    return int(result["errors"] + result["mismatches"] + result["refused"])


def wait_until_echoing(tool: Path, port: int) -> None:
    """A proxy's port may be open before its app is; wait for one echo through it."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last: dict[str, Any] | str = "port never opened"
    while time.monotonic() < deadline:
        if procs.port_open(port):
            last = _run_load(tool, port, 1, 16, False, 0, 0.2)
            if last["echoes"]:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no WebSocket echo through :{port} within {READY_TIMEOUT_SECONDS}s: {last}")


def _rss_mib(pids: list[int]) -> float | None:
    if not pids:
        return None
    return sum(procs.rss_kib(pid) for pid in pids) / 1024


def _idle(tool: Path, port: int, pids: list[int]) -> dict[str, Any]:
    """Open IDLE_CONNECTIONS WebSockets, read the proxy's RSS while they sit idle, close them."""
    argv = [str(tool), "idle", str(port), PATH, str(IDLE_CONNECTIONS), "1"]
    holder = subprocess.Popen(
        procs.pinned(procs.LOAD_CORE, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = _readline(holder, IDLE_TIMEOUT_SECONDS)
        opened: dict[str, Any] = json.loads(line)
        time.sleep(IDLE_SETTLE_SECONDS)
        rss = _rss_mib(pids)
        holder.stdin.close()
        holder.wait(timeout=TOOL_SLACK_SECONDS)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    return {
        "ws_idle_open": opened["open"],
        "ws_idle_rss_mib": rss,
        "ws_idle_bad": opened["refused"] + opened["errors"],
    }


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line `proc` prints, within `timeout` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"wsbench idle printed nothing in {timeout}s")
    return proc.stdout.readline()


def _cpu(pids: list[int]) -> float | None:
    try:
        return sum(procs.cpu_seconds(pid) for pid in pids) if pids else None
    except OSError:
        return None


def wait_until_quiet(pids: list[int]) -> None:
    deadline = time.monotonic() + QUIET_TIMEOUT_SECONDS
    before = _cpu(pids)
    while before is not None and time.monotonic() < deadline:
        time.sleep(QUIET_WINDOW_SECONDS)
        after = _cpu(pids)
        if after is None or after - before < QUIET_CORES * QUIET_WINDOW_SECONDS:
            return
        before = after


def measure(
    peer: peers.Peer, ctx: peers.Context, tool: Path, echo_port: int, opts: dict[str, int]
) -> dict[str, Any]:
    """Sample fields `ws_*` for one peer: a process of its own, upstream = the echo server."""
    fields: dict[str, Any] = {}
    running = peer.start(replace(ctx, upstream_port=echo_port))
    try:
        wait_until_echoing(tool, running.port)
        pids = running.measured_pids()
        fields["ws_base_rss_mib"] = _rss_mib(pids)
        fields.update(_idle(tool, running.port, pids))
        idle, base = fields["ws_idle_rss_mib"], fields["ws_base_rss_mib"]
        if idle is not None and base is not None and fields["ws_idle_open"]:
            fields["ws_idle_kib_per_conn"] = (idle - base) * 1024 / fields["ws_idle_open"]
        wait_until_quiet(pids)
        warmup, seconds = opts["warmup"], opts["seconds"]
        _run_load(tool, running.port, CONNECTIONS, MESSAGE_BYTES, False, 0, warmup)
        cpu_before = _cpu(pids)
        small = _run_load(tool, running.port, CONNECTIONS, MESSAGE_BYTES, False, 0, seconds)
        cpu_after = _cpu(pids)
        fields["ws_rt_per_s"] = small["per_s"]
        fields["ws_rt_p50_ms"], fields["ws_rt_p99_ms"] = small["p50_ms"], small["p99_ms"]
        if cpu_before is not None and cpu_after is not None and small["echoes"]:
            fields["ws_rt_cpu_us"] = (cpu_after - cpu_before) / small["echoes"] * 1e6
        bulk = _run_load(tool, running.port, BULK_CONNECTIONS, BULK_BYTES, True, 0, seconds)
        fields["ws_bulk_per_s"] = bulk["per_s"]
        fields["ws_bad"] = _bad(small) + _bad(bulk) + fields.pop("ws_idle_bad")
    except Exception as exc:  # one peer failing must not end the run; it is reported
        fields["ws_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if running.proc is not None:
            procs.stop(running.proc)
    return fields


def available() -> str | None:
    """Why the scenario can't run here (no C compiler), or None."""
    if procs._which("cc") is None:
        return "no C compiler (cc) to build bench/wsbench.c"
    return None


def describe(unavailable: str | None, ws_only: bool) -> dict[str, Any]:
    """What the report says about the scenario's method."""
    return {
        "unavailable": unavailable,
        "only": ws_only,
        "connections": CONNECTIONS,
        "message_bytes": MESSAGE_BYTES,
        "bulk_connections": BULK_CONNECTIONS,
        "bulk_bytes": BULK_BYTES,
        "idle_connections": IDLE_CONNECTIONS,
    }
