"""Instructions per request under callgrind: a deterministic price of the forwarding path.

Usage (normally through bench/run, which installs valgrind first):
    bench/run --instructions [--against REF ...] [--repeat K]

Wall-clock req/s on a shared machine moves ±15 % from run to run; the instructions a process
executes do not. For each tree — the working tree and each `--against` git ref (checked out with
`git worktree add --detach` into bench/.work/, removed afterwards) — `python -m proxy serve` runs
under `valgrind --tool=callgrind` in front of the bench's nginx, once per request kind with N
requests and once with none, after the same warm-up; (total(N) − total(0)) / N is the price of
one request with startup and shutdown cancelled out. Requests go one at a time, round robin over
a few keep-alive connections, so the event loop sees the same events in every run.
Writes bench/.work/instructions.json and prints the table; a full `bench/run` measures the same
and puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers
import procs
import report
import upstream

REPO = peers.BENCH_DIR.parent
WORK = peers.BENCH_DIR / ".work"
RESULTS_JSON = WORK / "instructions.json"
DEFAULT_AGAINST = ["3caec74"]
KNOWN_LABELS = {"3caec74": "3caec74 (before hardening)"}
THIS_TREE = "this tree"
REQUESTS = 2000
WARMUP = 200  # per request kind, in every run, the N=0 one included
CONNECTIONS = 4
PENDING_KEYS = 100  # the warm-up opens every key's episode: measured polls find it open
READY_TIMEOUT_SECONDS = 180.0  # pollguard takes ~10 s to start under callgrind
READY_POLL_SECONDS = 0.2
REQUEST_TIMEOUT_SECONDS = 30.0
RUN_TIMEOUT_SECONDS = 900.0  # the requests of one process run, all together
SETTLE_SECONDS = 1.0  # after our connections close, before SIGTERM
STOP_TIMEOUT_SECONDS = 120.0
GIT_TIMEOUT_SECONDS = 120
HEAD_LIMIT = 64 * 1024
_TOTALS = re.compile(rb"^(totals|summary):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Kind:
    key: str
    title: str
    store: str  # "memory" or "redis": which config the proxy runs with
    status: int
    path: Callable[[int], str]


def _small(_index: int) -> str:
    return "/small"


def _pending(index: int) -> str:
    return f"/pending/job{index % PENDING_KEYS}"


def _open(index: int) -> str:
    return f"{peers.OPEN_PREFIX}{index % PENDING_KEYS}"


KINDS = [
    Kind("small_get", "small GET", "memory", 200, _small),
    # The same 202 as /pending/ on a route no job guards: guarded minus this is the guard.
    Kind("open_202", "unguarded 202", "memory", 202, _open),
    Kind("guarded_202_memory", "guarded 202 (memory)", "memory", 202, _pending),
    Kind("guarded_202_redis", "guarded 202 (Redis)", "redis", 202, _pending),
]


@dataclass(frozen=True)
class Tree:
    label: str
    ref: str | None  # None: the working tree as it is
    commit: str
    dirty: bool = False


def _log(message: str) -> None:
    print(f"[instructions {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_SECONDS,
        check=True,
    )
    return done.stdout.strip()


def trees(against: list[str]) -> list[Tree]:
    """The working tree first, then each ref; the first ref is what changes are relative to."""
    dirty = bool(_git("status", "--porcelain", "--", "proxy", "pyproject.toml"))
    found = [Tree(THIS_TREE, None, _git("rev-parse", "--short", "HEAD"), dirty)]
    for ref in against:
        commit = _git("rev-parse", "--short", f"{ref}^{{commit}}")
        label = KNOWN_LABELS.get(ref) or (ref if ref == commit else f"{ref} ({commit})")
        found.append(Tree(label, ref, commit))
    return found


@contextlib.contextmanager
def checkout(tree: Tree) -> Iterator[Path]:
    """The tree's files: the repository itself, or a detached worktree removed afterwards."""
    if tree.ref is None:
        yield REPO
        return
    path = WORK / f"instructions-tree-{tree.commit}"
    _remove_worktree(path)  # left over by a run that was killed
    _git("worktree", "add", "--detach", str(path), tree.commit)
    try:
        yield path
    finally:
        _remove_worktree(path)


def _remove_worktree(path: Path) -> None:
    if path.exists():
        with contextlib.suppress(subprocess.SubprocessError):
            _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(subprocess.SubprocessError):
        _git("worktree", "prune")


def _environment(tree_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree_path), "PYTHONHASHSEED": "0"}
    for name in ("POLLGUARD_CONFIG", "REDIS_URL", "POLLGUARD_ADMIN_TOKEN", "PYTHONPYCACHEPREFIX"):
        env.pop(name, None)
    return env


def prepare(tree_path: Path, env: dict[str, str]) -> None:
    """Byte-compile the tree first (else only the first run pays for it) and check that
    `import proxy` finds this tree's package, not the one installed in the venv."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree_path / "proxy")],
        env=env,
        cwd=tree_path,
        check=True,
        timeout=GIT_TIMEOUT_SECONDS,
        stdout=subprocess.DEVNULL,
    )
    done = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        env=env,
        cwd=tree_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=GIT_TIMEOUT_SECONDS,
    )
    found = Path(done.stdout.strip()).resolve()
    if not found.is_relative_to(tree_path.resolve()):
        raise RuntimeError(f"`import proxy` in {tree_path} finds {found}, not the tree's own")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    raise RuntimeError(f"response without Content-Length: {head[:200]!r}")


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the proxy closed a keep-alive connection")
    return chunk


def get(sock: socket.socket, path: str) -> int:
    """One GET on a kept-alive connection, read to the end of its body; the status.

    wrk's request, with a Host that does not vary with the port: the same bytes in every run."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > HEAD_LIMIT:
            raise RuntimeError(f"response head over {HEAD_LIMIT} bytes")
        received += _recv(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    length = _content_length(head)
    while len(body) < length:
        body += _recv(sock)
    if len(body) != length:
        raise RuntimeError(f"{len(body) - length} bytes past the end of the response to {path}")
    return int(head.split(b" ", 2)[1])


class Client:
    """A few keep-alive connections, one request in flight at a time, round robin."""

    def __init__(self, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.sent = 0
        self.socks: list[socket.socket] = []
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_SECONDS)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)

    def send(self, kind: Kind, count: int) -> None:
        for index in range(count):
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"requests not done within {RUN_TIMEOUT_SECONDS:.0f}s")
            status = get(self.socks[self.sent % CONNECTIONS], kind.path(index))
            self.sent += 1
            if status != kind.status:
                raise RuntimeError(f"{kind.path(index)}: {status}, expected {kind.status}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Refused connects cost the proxy nothing; the one accepted costs the same in every run."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pollguard under callgrind exited with {proc.returncode}")
        if procs.port_open(port):
            return
        time.sleep(READY_POLL_SECONDS)
    raise TimeoutError(f"pollguard under callgrind not listening after {READY_TIMEOUT_SECONDS}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (callgrind writes its totals when the process exits), SIGKILL after a timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        procs.stop(proc)
        raise TimeoutError(
            f"pollguard did not exit {STOP_TIMEOUT_SECONDS:.0f}s after SIGTERM"
        ) from exc


def read_totals(path: Path) -> int:
    """The instructions executed: callgrind's `totals:` line (or `summary:`)."""
    found = dict(_TOTALS.findall(path.read_bytes()))
    value = found.get(b"totals") or found.get(b"summary")
    if value is None:
        raise RuntimeError(f"no totals in {path}")
    return int(value)


def callgrind_run(
    tree_path: Path, env: dict[str, str], config: Path, warmup: list[Kind], measured: Kind | None
) -> int:
    """Instructions of one pollguard process: warm-up, then `REQUESTS` of `measured` (or none)."""
    port = procs.free_port()
    name = f"instructions-{measured.key if measured else 'baseline'}"
    out, log = WORK / f"{name}.callgrind", WORK / "logs" / f"{name}.log"
    out.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = procs.start(argv, log=log, env=env, cwd=tree_path)
    try:
        _wait_ready(port, proc)
        client = Client(port, time.monotonic() + RUN_TIMEOUT_SECONDS)
        try:
            for kind in warmup:
                client.send(kind, WARMUP)
            if measured is not None:
                client.send(measured, REQUESTS)
        finally:
            client.close()
        time.sleep(SETTLE_SECONDS)
        _stop(proc)
        # uvicorn re-raises the SIGTERM it handled once it has shut down.
        if proc.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"pollguard exited with {proc.returncode}; see {log}")
        return read_totals(out)
    finally:
        procs.stop(proc)
        out.unlink(missing_ok=True)


def _flush_redis(port: int) -> None:
    """Every Redis run starts from the same empty store and script cache."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"FLUSHALL\r\nSCRIPT FLUSH\r\n")
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += _recv(sock)
    if reply != b"+OK\r\n+OK\r\n":
        raise RuntimeError(f"redis FLUSHALL/SCRIPT FLUSH answered {reply!r}")


def _run(
    tree_path: Path, env: dict[str, str], ctx: peers.Context, store: str, measured: Kind | None
) -> int:
    kinds = [kind for kind in KINDS if kind.store == store]
    redis = store == "redis"
    if redis and ctx.redis_port is not None:
        _flush_redis(ctx.redis_port)
    config = WORK / f"instructions-{store}.yaml"
    config.write_text(peers.pollguard_config(ctx, redis))
    return callgrind_run(tree_path, env, config, kinds, measured)


def measure_tree(tree_path: Path, ctx: peers.Context) -> dict[str, float]:
    """Instructions per request of each kind, for one tree."""
    env = _environment(tree_path)
    prepare(tree_path, env)
    per_request: dict[str, float] = {}
    for store in ("memory", "redis"):
        if store == "redis" and ctx.redis_port is None:
            continue
        baseline = _run(tree_path, env, ctx, store, None)
        _log(f"  {store} store, warm-up only: {baseline:,} instructions")
        for kind in (kind for kind in KINDS if kind.store == store):
            total = _run(tree_path, env, ctx, store, kind)
            per_request[kind.key] = (total - baseline) / REQUESTS
            _log(f"  {kind.title}: {per_request[kind.key]:,.0f} instructions/request")
    return per_request


def _valgrind_version() -> str:
    return upstream.tool_version(["valgrind", "--version"])


def measure(ctx: peers.Context, against: list[str], repeat: int = 1) -> dict[str, Any]:
    """Every tree, `repeat` times; the section results.json carries under "instructions"."""
    found = trees(against)
    values: dict[str, dict[str, list[float]]] = {tree.label: {} for tree in found}
    errors: dict[str, str] = {}
    for round_number in range(1, repeat + 1):
        for tree in found:
            if tree.label in errors:
                continue
            _log(f"repeat {round_number}/{repeat}: {tree.label}")
            try:
                with checkout(tree) as path:
                    for key, value in measure_tree(path, ctx).items():
                        values[tree.label].setdefault(key, []).append(value)
            except Exception as exc:  # one tree failing must not lose the others
                errors[tree.label] = f"{type(exc).__name__}: {exc}"
                _log(f"  {tree.label}: {errors[tree.label]}")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "valgrind": _valgrind_version(),
        "python": sys.version.split()[0],
        "requests": REQUESTS,
        "warmup": WARMUP,
        "connections": CONNECTIONS,
        "pending_keys": PENDING_KEYS,
        "repeat": repeat,
        "kinds": [{"key": kind.key, "title": kind.title} for kind in KINDS],
        "trees": [
            {
                "label": tree.label,
                "ref": tree.ref,
                "commit": tree.commit,
                "dirty": tree.dirty,
                "values": values[tree.label],
                "error": errors.get(tree.label),
            }
            for tree in found
        ],
    }


def unavailable() -> str | None:
    """Why instructions can't be counted here, or None."""
    if shutil.which("valgrind") is None:
        return "valgrind not installed (bench/run installs it for full runs and --instructions)"
    return None


def measure_safely(ctx: peers.Context, against: list[str]) -> dict[str, Any]:
    """For the full bench run: a failure here is reported, it does not end the run."""
    why = unavailable()
    if why is not None:
        return {"unavailable": why}
    try:
        return measure(ctx, against)
    except Exception as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def _exit_code(results: dict[str, Any]) -> int:
    this_tree = results["trees"][0]
    return 1 if this_tree["error"] or not this_tree["values"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--against",
        action="append",
        metavar="REF",
        help=f"git ref to compare with, repeatable (default: {' '.join(DEFAULT_AGAINST)})",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure every tree this many times (spread)"
    )
    args = parser.parse_args()
    why = unavailable()
    if why is not None:
        raise SystemExit(why)
    WORK.mkdir(parents=True, exist_ok=True)
    procs.install_cleanup()
    started = time.monotonic()
    try:
        www = WORK / "www"
        www.mkdir(parents=True, exist_ok=True)
        # Only /small, /pending and /open are asked for: no need to generate the download files.
        files = upstream.UpstreamFiles(
            www, b"", www / "files" / "50m.bin", www / "files" / "500m.bin"
        )
        _proc, upstream_port = upstream.start_upstream(WORK, files)
        redis_port = None
        if shutil.which("redis-server"):
            redis_port = upstream.start_redis(WORK)[1]
        ctx = peers.Context(work=WORK, upstream_port=upstream_port, redis_port=redis_port)
        results = measure(ctx, args.against or DEFAULT_AGAINST, args.repeat)
    finally:
        procs.stop_all()
    RESULTS_JSON.write_text(json.dumps(results, indent=2))
    print("\n".join(report.instructions_section(results)))
    _log(f"wrote {RESULTS_JSON} ({time.monotonic() - started:.0f} s)")
    return _exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
