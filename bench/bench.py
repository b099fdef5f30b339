"""Benchmark pollguard against nginx and the Python proxies, in one run, on one machine.

Usage (normally through bench/run, which installs everything first):
    python bench/bench.py [--quick] [--rounds N] [--peers a,b] [--scale-out rows] [--ws-only]
                          [--report-only]
Peers are measured in alternating order, round after round, so machine drift hits all of
them equally; the report shows medians with min–max. Each round measures HTTP, then WebSockets
(bench/ws.py) in a second process of the same peer. Then the scale-out rows (bench/scaleout.py:
herd, replicas, topologies, workers), as many rounds.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import checks
import frozen_redis
import instructions
import load
import peers
import procs
import report
import scaleout
import upstream
import ws

REPO = peers.BENCH_DIR.parent
WORK = peers.BENCH_DIR / ".work"
RESULTS_JSON = WORK / "results.json"
REDIS_REPLY_LIMIT = 1024 * 1024
# frozen: seconds Redis stays SIGSTOPped in the frozen-Redis scenario (the issue measured 10 s).
FULL = {"rounds": 3, "seconds": 10, "warmup": 2, "downloads": 10, "frozen": 10}
QUICK = {"rounds": 1, "seconds": 2, "warmup": 1, "downloads": 10, "frozen": 2}
AGAINST = instructions.DEFAULT_AGAINST  # git refs whose instruction counts a full run shows


@dataclass
class Sample:
    """Everything measured for one peer in one round."""

    startup_ms: float | None = None
    small_rps: float | None = None
    small_p50_ms: float | None = None
    small_p99_ms: float | None = None
    small_cpu_us: float | None = None
    small_bad: int = 0
    pending_rps: float | None = None
    pending_p99_ms: float | None = None
    pending_cpu_us: float | None = None
    pending_bad: int = 0
    # pollguard only: the same 202 on a route no job guards — what guarding costs, alone.
    open_rps: float | None = None
    open_cpu_us: float | None = None
    foreign_cores: float | None = None
    redis_per_get: float | None = None  # Redis commands per unguarded GET (should be 0)
    redis_per_202: float | None = None  # Redis commands per guarded pending answer
    download_s: float | None = None
    peak_rss_mib: float | None = None
    rss_growth_mib: float | None = None
    # Redis peers only: guarded 202s on fresh keys, before / while / after Redis is SIGSTOPped
    frozen_normal_rps: float | None = None
    frozen_normal_p50_ms: float | None = None
    frozen_normal_p99_ms: float | None = None
    frozen_normal_evalsha_per_req: float | None = None
    frozen_normal_bad: int = 0
    frozen_frozen_rps: float | None = None
    frozen_frozen_p50_ms: float | None = None
    frozen_frozen_p99_ms: float | None = None
    frozen_frozen_evalsha_per_req: float | None = None
    frozen_frozen_bad: int = 0
    frozen_after_rps: float | None = None
    frozen_after_p50_ms: float | None = None
    frozen_after_p99_ms: float | None = None
    frozen_after_evalsha_per_req: float | None = None
    frozen_after_bad: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # The WebSocket scenario (bench/ws.py): the peer again, its upstream the echo server
    ws_rt_per_s: float | None = None  # echo round trips, 32 connections, 64 B text
    ws_rt_p50_ms: float | None = None
    ws_rt_p99_ms: float | None = None
    ws_rt_cpu_us: float | None = None
    ws_bulk_per_s: float | None = None  # 1 MiB binary echoes, 4 connections (= MiB/s each way)
    ws_base_rss_mib: float | None = None  # the fresh process, before any WebSocket
    ws_idle_open: int | None = None
    ws_idle_rss_mib: float | None = None  # with 1,000 idle WebSockets open
    ws_idle_kib_per_conn: float | None = None
    ws_bad: int = 0  # refused, broken or wrong echoes
    ws_error: str | None = None


def _redis_command(port: int, command: bytes) -> bytes:
    """One inline command, reply read until it is complete (bounded by size and timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        reply = sock.recv(65536)
        if reply.startswith(b"$"):
            header, _, body = reply.partition(b"\r\n")
            while len(body) < int(header[1:]) and len(reply) < REDIS_REPLY_LIMIT:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            return body
        return reply


def _redis_calls(port: int | None) -> int | None:
    """Commands Redis has executed so far, not counting our own INFO/FLUSHALL."""
    if port is None:
        return None
    stats = _redis_command(port, b"INFO commandstats").decode()
    total = 0
    for line in stats.splitlines():
        name, _, fields = line.partition(":")
        if name.startswith("cmdstat_") and name not in ("cmdstat_info", "cmdstat_flushall"):
            total += int(fields.split("calls=", 1)[1].split(",", 1)[0])
    return total


def _redis_script_calls(port: int) -> int:
    """EVAL/EVALSHA commands Redis has executed: one per guarded poll that reached it."""
    stats = _redis_command(port, b"INFO commandstats").decode()
    total = 0
    for line in stats.splitlines():
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            total += int(fields.split("calls=", 1)[1].split(",", 1)[0])
    return total


def _per_request(before: int | None, after: int | None, requests: int) -> float | None:
    if before is None or after is None or not requests:
        return None
    return (after - before) / requests


@dataclass(frozen=True)
class WsSetup:
    tool: Path
    echo_port: int


def measure(
    peer: peers.Peer,
    ctx: peers.Context,
    ref: checks.Reference | None,
    opts: dict[str, int],
    ws_setup: WsSetup | None,
) -> Sample:
    """One round of one peer: HTTP (unless `ref` is None: --ws-only), then WebSockets."""
    sample = Sample()
    if ref is not None:
        _measure_http(peer, ctx, ref, opts, sample)
    if ws_setup is not None and peer.websocket:
        fields = ws.measure(peer, ctx, ws_setup.tool, ws_setup.echo_port, opts)
        for name, value in fields.items():
            setattr(sample, name, value)
    return sample


def _measure_http(
    peer: peers.Peer,
    ctx: peers.Context,
    ref: checks.Reference,
    opts: dict[str, int],
    sample: Sample,
) -> None:
    if peer.needs_redis and ctx.redis_port:
        _redis_command(ctx.redis_port, b"FLUSHALL")
    started = time.perf_counter()
    running = peer.start(ctx)
    try:
        startup = load.time_to_first_response(running.port, started)
        if running.proc is not None:
            sample.startup_ms = startup * 1000
        sample.checks = [asdict(result) for result in checks.run_checks(running.port, ref)]
        pids = running.measured_pids()
        load.run_wrk(running.port, "/small", opts["warmup"], [])
        redis_port = ctx.redis_port if peer.needs_redis else None
        calls_before = _redis_calls(redis_port)
        small = load.run_wrk(running.port, "/small", opts["seconds"], pids, ctx.background_pids)
        calls_between = _redis_calls(redis_port)
        sample.redis_per_get = _per_request(calls_before, calls_between, small.requests)
        sample.small_rps, sample.small_p50_ms, sample.small_p99_ms = (
            small.req_per_s,
            small.p50_ms,
            small.p99_ms,
        )
        sample.small_cpu_us, sample.small_bad = (
            small.cpu_us_per_request,
            small.non_2xx + small.socket_errors,
        )
        if peer.small_only:
            return
        pending = load.run_wrk(
            running.port,
            peers.PENDING_PATH,
            opts["seconds"],
            pids,
            ctx.background_pids,
            script=peers.PENDING_SCRIPT,
            script_env={"BENCH_PENDING_KEYS": str(peers.PENDING_KEYS)},
        )
        sample.foreign_cores = max(small.foreign_cores, pending.foreign_cores)
        sample.redis_per_202 = _per_request(
            calls_between, _redis_calls(redis_port), pending.requests
        )
        sample.pending_rps, sample.pending_p99_ms = pending.req_per_s, pending.p99_ms
        sample.pending_cpu_us = pending.cpu_us_per_request
        sample.pending_bad = pending.non_2xx + pending.socket_errors
        if peer.is_pollguard:
            unguarded = load.run_wrk(
                running.port,
                peers.OPEN_PATH,
                opts["seconds"],
                pids,
                ctx.background_pids,
                script=peers.PENDING_SCRIPT,
                script_env={
                    "BENCH_PENDING_KEYS": str(peers.PENDING_KEYS),
                    "BENCH_PENDING_PREFIX": peers.OPEN_PREFIX,
                },
            )
            sample.open_rps = unguarded.req_per_s
            sample.open_cpu_us = unguarded.cpu_us_per_request
            sample.pending_bad += unguarded.non_2xx + unguarded.socket_errors
        with load.PeakRss(pids) as during_50:
            sample.download_s = load.timed_downloads(
                running.port, "/files/50m.bin", upstream.SMALL_FILE_BYTES, opts["downloads"]
            )
        with load.PeakRss(pids) as during_500:
            load.download(running.port, "/files/500m.bin", upstream.LARGE_FILE_BYTES)
        if pids:
            sample.peak_rss_mib = during_50.peak_mib()
            sample.rss_growth_mib = during_500.peak_mib() - during_50.peak_mib()
        if redis_port is not None and ctx.redis_pid is not None:
            # Last: it leaves Redis full of fresh records and the breaker just closed.
            frozen = frozen_redis.measure(
                running.port,
                ctx.redis_pid,
                lambda: _redis_script_calls(redis_port),
                opts["seconds"],
                opts["frozen"],
                pids,
                ctx.background_pids,
            )
            for name, value in frozen.items():
                setattr(sample, name, value)
    except Exception as exc:  # one peer failing must not end the run; it is reported
        sample.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if running.proc is not None:
            procs.stop(running.proc)


def _start_ws() -> tuple[WsSetup | None, Any, str | None]:
    """Build wsbench and start its echo server: (setup, echo process, why not)."""
    why = ws.available()
    if why is not None:
        return None, None, why
    try:
        tool = ws.build_tool(WORK)
        echo_proc, echo_port = ws.start_echo(WORK, tool)
    except (OSError, RuntimeError, TimeoutError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    except subprocess.CalledProcessError as exc:
        return None, None, f"cc failed: {exc.stderr.strip()[-500:]}"
    return WsSetup(tool, echo_port), echo_proc, None


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    opts = dict(QUICK if args.quick else FULL)
    if args.rounds:
        opts["rounds"] = args.rounds
    if args.seconds:
        opts["seconds"] = args.seconds
    selected = [p for p in peers.PEERS if not args.peers or p.name in args.peers.split(",")]
    rows: tuple[str, ...] = args.scale_out
    if args.ws_only:
        selected = [p for p in selected if p.websocket]
    WORK.mkdir(parents=True, exist_ok=True)
    procs.install_cleanup()
    procs.raise_nofile_limit()  # inherited: 1,000 WebSockets through a peer are 2,000 sockets
    pinning = (
        f"proxy pinned to core {procs.PROXY_CORE}; wrk, nginx upstream, redis and curl on core "
        f"{procs.LOAD_CORE} (taskset)"
        if procs.pinning_available()
        else f"NOT pinned ({procs.cpu_count()} core(s) or no taskset): all processes share the CPU"
    )
    _log(pinning)
    meta = report.collect_meta(REPO, pinning, opts, quick=args.quick)
    ws_setup, echo_proc, ws_unavailable = _start_ws()
    meta["ws"] = ws.describe(ws_unavailable, ws_only=args.ws_only)
    if ws_unavailable:
        _log(f"WebSocket scenario: n/a ({ws_unavailable})")
    if args.ws_only:
        if ws_setup is None:
            _log("FAILED: --ws-only, but the WebSocket scenario can't run")
            return 1
        upstream_proc, upstream_port, ref = None, ws_setup.echo_port, None
    else:
        _log("generating upstream files (50 MiB, 500 MiB) in bench/.work")
        files = upstream.prepare_files(WORK)
        upstream_proc, upstream_port = upstream.start_upstream(WORK, files)
        ref = checks.Reference(files=files, upstream_port=upstream_port)
    redis_port = None
    redis_proc = None
    if not args.ws_only and any(p.needs_redis for p in selected):
        try:
            redis_proc, redis_port = upstream.start_redis(WORK)
        except (OSError, RuntimeError, TimeoutError) as exc:
            _log(f"redis-server could not start: {exc}")
    background = (procs.children(upstream_proc.pid) if upstream_proc else []) + (
        [redis_proc.pid] if redis_proc else []
    )
    ctx = peers.Context(
        work=WORK,
        upstream_port=upstream_port,
        redis_port=redis_port,
        redis_pid=redis_proc.pid if redis_proc else None,
        background_pids=tuple(background),
    )

    unavailable: dict[str, str] = {}
    for peer in selected:
        ok, why = peers.importable(peer.import_check)
        if peer.needs_redis and redis_port is None:
            ok, why = False, "redis-server unavailable"
        if not ok:
            unavailable[peer.name] = why or "not installed"
            _log(f"{peer.name}: n/a ({unavailable[peer.name]})")
    runnable = [p for p in selected if p.name not in unavailable]

    samples: dict[str, list[dict[str, Any]]] = {p.name: [] for p in runnable}
    for round_number in range(1, opts["rounds"] + 1):
        order = runnable[round_number - 1 :] + runnable[: round_number - 1]  # rotate the start
        for peer in order:
            _log(f"round {round_number}/{opts['rounds']}: {peer.name}")
            sample = measure(peer, ctx, ref, opts, ws_setup)
            failed = [c["name"] for c in sample.checks if not c["passed"]]
            if ref is not None:
                _log(
                    f"  {peer.name}: small {sample.small_rps} req/s, p99 {sample.small_p99_ms} "
                    f"ms, 202 {sample.pending_rps} req/s, downloads {sample.download_s} s, peak "
                    f"RSS {sample.peak_rss_mib} MiB, checks failed {failed}, error {sample.error}"
                )
            if ws_setup is not None and peer.websocket:
                _log(
                    f"  {peer.name}: WebSocket echo {_r(sample.ws_rt_per_s)} round trips/s "
                    f"(p99 {sample.ws_rt_p99_ms} ms), 1 MiB {_r(sample.ws_bulk_per_s)} MiB/s, "
                    f"{sample.ws_idle_open} idle: RSS {_r(sample.ws_idle_rss_mib)} MiB "
                    f"(fresh {_r(sample.ws_base_rss_mib)}), bad {sample.ws_bad}, "
                    f"error {sample.ws_error}"
                )
            if sample.frozen_frozen_rps is not None:
                segments = ", ".join(
                    f"{segment} {getattr(sample, f'frozen_{segment}_rps')} req/s "
                    f"p50 {getattr(sample, f'frozen_{segment}_p50_ms')} ms "
                    f"p99 {getattr(sample, f'frozen_{segment}_p99_ms')} ms"
                    for segment in frozen_redis.SEGMENTS
                )
                _log(f"  {peer.name}: Redis frozen {opts['frozen']} s, guarded 202: {segments}")
            samples[peer.name].append(asdict(sample))
    scaled = None
    if not args.ws_only and rows:
        scaled = scaleout.measure(ctx, files, opts, rows)
    # Deterministic instruction counts: full runs only (valgrind is slow; --quick is CI's).
    counted = None
    if not args.quick and not args.ws_only and any(p.is_pollguard for p in runnable):
        _log("instructions per request under callgrind: this tree and " + ", ".join(AGAINST))
        counted = instructions.measure_safely(ctx, AGAINST)
    for proc in (upstream_proc, echo_proc):
        if proc is not None:
            procs.stop(proc)

    results = {
        "meta": meta,
        "peers": [
            {
                "name": p.name,
                "description": p.description,
                "is_pollguard": p.is_pollguard,
                "unavailable": unavailable.get(p.name),
                "samples": samples.get(p.name, []),
            }
            for p in selected
        ],
        "instructions": counted,
        "scaleout": scaled,
    }
    RESULTS_JSON.write_text(json.dumps(results, indent=2))
    # A --quick smoke run (CI) or a partial one must not overwrite the committed full report.
    out = RESULTS_JSON.parent if args.quick or args.ws_only else REPO / "docs"
    report.write(results, out / "benchmarks.md", out / "benchmarks.png")
    _log(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.png'}")
    return _exit_code(results)


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _exit_code(results: dict[str, Any]) -> int:
    """Non-zero only when pollguard itself could not be benchmarked; other peers may be n/a."""
    broken = []
    for peer in results["peers"]:
        if not peer["is_pollguard"]:
            continue
        samples = peer["samples"]
        if (
            peer["unavailable"]
            or not samples
            or any(s.get("error") or s.get("ws_error") for s in samples)
        ):
            broken.append(peer["name"])
    # A scale-out row that raised (not one missing a speed target, not one n/a here).
    broken += [f"scale-out {row}" for row in ((results.get("scaleout") or {}).get("errors") or {})]
    if broken:
        _log(f"FAILED: pollguard could not be benchmarked: {', '.join(broken)}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round, seconds per measurement (CI smoke)"
    )
    parser.add_argument("--rounds", type=int, help="rounds of all peers (default 3; quick 1)")
    parser.add_argument(
        "--seconds", type=int, help="wrk duration per measurement (default 10; quick 2)"
    )
    parser.add_argument(
        "--peers", help="comma-separated subset of: " + ", ".join(p.name for p in peers.PEERS)
    )
    parser.add_argument(
        "--scale-out",
        type=scaleout.parse_rows,
        default=scaleout.ROWS,
        help="comma-separated subset of the scale-out rows to measure: "
        + ", ".join(scaleout.ROWS)
        + "; 'all' (default) or 'none'",
    )
    parser.add_argument(
        "--ws-only",
        action="store_true",
        help="only the WebSocket scenario (report in bench/.work, docs/ untouched)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="re-render docs/ from bench/.work/results.json"
    )
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(RESULTS_JSON.read_text())
        report.write(results, REPO / "docs" / "benchmarks.md", REPO / "docs" / "benchmarks.png")
        return _exit_code(results)
    try:
        return run(args)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
