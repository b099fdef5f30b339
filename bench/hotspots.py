"""Profile pollguard's unguarded small-GET path under wrk load with py-spy.

Usage: bench/run --profile [--seconds S] [--path /small]
Writes bench/.work/profile.svg (flame graph), bench/.work/profile.txt (collapsed stacks) and
bench/.work/profile-summary.txt (top functions by own time and by inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import load
import peers
import procs
import upstream

WORK = peers.BENCH_DIR / ".work"
SAMPLE_RATE = 200
TOP = 25
WRK_EXTRA_SECONDS = 4
ROOT_SHARE = 0.99  # frames on (nearly) every stack are the event loop itself: not news


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not installed: bench/run --profile installs it into bench/.venv")
    return found


def _record(pid: int, seconds: int, fmt: str, output: Path, native: bool) -> None:
    argv = [
        _py_spy(),
        "record",
        *(["--native"] if native else []),
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        fmt,
        "--output",
        str(output),
        "--nolineno",
    ]
    subprocess.run(
        procs.pinned(procs.LOAD_CORE, argv),
        check=True,
        timeout=seconds + 60,
        stdout=subprocess.DEVNULL,
    )


def summarize(collapsed: Path) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [
        f"{total} samples of busy (non-idle) time at {SAMPLE_RATE} Hz",
        "",
        "own time (leaf frames):",
    ]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(TOP)]
    out += ["", "inclusive time (frame anywhere on the stack; frames on every stack left out):"]
    below_root = [(frame, n) for frame, n in inclusive.most_common() if n < ROOT_SHARE * total]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in below_root[:TOP]]
    return "\n".join(out) + "\n"


def _short(frame: str) -> str:
    """'send (aiohttp/client_reqrep.py)' with the site-packages prefix cut off."""
    name, _, where = frame.partition(" (")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where}" if where else name


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=int, default=15, help="seconds per py-spy recording (default 15)"
    )
    parser.add_argument(
        "--path", default="/small", help="path wrk hits (default /small, unguarded)"
    )
    parser.add_argument(
        "--peer",
        default="pollguard",
        choices=[p.name for p in peers.PEERS if p.import_check],
        help="Python peer to profile (default pollguard)",
    )
    parser.add_argument(
        "--native", action="store_true", help="include C frames (uvloop, httptools)"
    )
    parser.add_argument(
        "--pending-keys",
        action="store_true",
        help="hit /pending/job<n> over many keys (bench/pending_keys.lua), like the benchmark",
    )
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    procs.install_cleanup()
    files = upstream.prepare_files(WORK)
    _upstream_proc, upstream_port = upstream.start_upstream(WORK, files)
    peer = next(p for p in peers.PEERS if p.name == args.peer)
    redis_port = upstream.start_redis(WORK)[1] if peer.needs_redis else None
    ctx = peers.Context(work=WORK, upstream_port=upstream_port, redis_port=redis_port)
    running = peer.start(ctx)
    load.time_to_first_response(running.port, time.perf_counter())
    if running.proc is None:
        raise SystemExit(f"{args.peer} is not a process of its own: profile a proxy peer")
    load.run_wrk(running.port, args.path, 2, [])  # warm-up
    wrk_seconds = 2 * args.seconds + WRK_EXTRA_SECONDS
    url = f"http://127.0.0.1:{running.port}{args.path}"
    (WORK / "logs" / "profile-wrk.log").unlink(missing_ok=True)
    wrk = procs.start(
        procs.pinned(
            procs.LOAD_CORE,
            [
                "wrk",
                *(["-s", str(peers.PENDING_SCRIPT)] if args.pending_keys else []),
                "-t1",
                "-c32",
                f"-d{wrk_seconds}s",
                "--latency",
                url,
            ],
        ),
        log=WORK / "logs" / "profile-wrk.log",
        env={**os.environ, "BENCH_PENDING_KEYS": str(peers.PENDING_KEYS)},
    )
    time.sleep(1)
    suffix = "" if args.peer == "pollguard" else f"-{args.peer}"
    collapsed, svg = WORK / f"profile{suffix}.txt", WORK / f"profile{suffix}.svg"
    _record(running.proc.pid, args.seconds, "raw", collapsed, args.native)
    _record(running.proc.pid, args.seconds, "flamegraph", svg, args.native)
    wrk.wait(timeout=wrk_seconds + 30)
    summary = summarize(collapsed)
    wrk_out = (WORK / "logs" / "profile-wrk.log").read_text()
    rate = next((line for line in wrk_out.splitlines() if "Requests/sec" in line), "?").strip()
    summary = f"{args.peer} under wrk -c32 on {args.path} ({rate}; py-spy attached)\n\n" + summary
    (WORK / f"profile{suffix}-summary.txt").write_text(summary)
    print(summary)
    print(f"flame graph: {svg}\ncollapsed stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
