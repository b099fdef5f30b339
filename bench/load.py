"""Load generation and resource measurement: wrk, sequential downloads, startup, RSS, CPU.

Every loop here is bounded both in count and in wall-clock time.
"""

from __future__ import annotations

import http.client
import os
import re
import resource
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import procs

WRK_CONNECTIONS = 32
WRK_THREADS = 1  # one core for wrk + upstream: more threads would only contend
WRK_REQUEST_TIMEOUT = "5s"
WRK_SLACK_SECONDS = 30
DOWNLOAD_TIMEOUT_SECONDS = 120
STARTUP_TIMEOUT_SECONDS = 30.0
STARTUP_POLL_SECONDS = 0.005
RSS_SAMPLE_SECONDS = 0.02
READ_CHUNK = 256 * 1024
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu_us_per_request: float | None
    foreign_cores: float  # CPU used meanwhile by processes that are not part of the benchmark


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unparseable wrk latency {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> tuple[int, float, float, float, int, int]:
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _latency_ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _latency_ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    non_2xx_match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors_match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = int(non_2xx_match.group(1)) if non_2xx_match else 0
    errors = sum(int(g) for g in errors_match.groups()) if errors_match else 0
    return requests, rate, p50, p99, non_2xx, errors


def _cpu_total(pids: list[int]) -> float | None:
    try:
        return sum(procs.cpu_seconds(pid) for pid in pids)
    except OSError:
        return None


class ForeignLoad:
    """CPU used on the machine by anything but the benchmark's own processes, in cores.

    Machine busy time (/proc/stat, steal included) minus the proxy, the upstream, redis, our
    waited-for children (wrk) and ourselves. Other jobs on the machine skew every figure; this
    makes that visible instead of silently folding it into the results.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime
        ours += _cpu_total(self.pids) or 0.0
        return time.monotonic(), procs.machine_busy_seconds(), ours

    def cores(self) -> float:
        wall0, busy0, ours0 = self._start
        wall1, busy1, ours1 = self._snapshot()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(wall1 - wall0, 1e-9))


def run_wrk(
    port: int,
    path: str,
    seconds: int,
    pids: list[int],
    background_pids: Sequence[int] = (),
    script: Path | None = None,
    script_env: dict[str, str] | None = None,
    connections: int = WRK_CONNECTIONS,
    pin: bool = True,
) -> WrkResult:
    """wrk on the load core (`pin`), or wherever the scheduler puts it (unpinned runs)."""
    url = f"http://127.0.0.1:{port}{path}"
    argv = [
        "wrk",
        *(["-s", str(script)] if script else []),
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        WRK_REQUEST_TIMEOUT,
        url,
    ]
    cpu_before = _cpu_total(pids) if pids else None
    foreign = ForeignLoad([*pids, *background_pids])
    done = subprocess.run(
        procs.pinned(procs.LOAD_CORE, argv) if pin else argv,
        capture_output=True,
        text=True,
        timeout=seconds + WRK_SLACK_SECONDS,
        check=True,
        env={**os.environ, **(script_env or {})},
    )
    cpu_after = _cpu_total(pids) if pids else None
    foreign_cores = foreign.cores()
    requests, rate, p50, p99, non_2xx, errors = parse_wrk(done.stdout)
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and requests:
        cpu_us = (cpu_after - cpu_before) / requests * 1e6
    return WrkResult(requests, rate, p50, p99, non_2xx, errors, cpu_us, foreign_cores)


class PeakRss:
    """Peak RSS of some processes while a block runs: VmHWM after a reset, or sampled VmRSS."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._stop = threading.Event()
        self._sampled: dict[int, int] = dict.fromkeys(pids, 0)
        self._hwm_reset = all(procs.reset_peak_rss(pid) for pid in pids)
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            for pid in self.pids:
                try:
                    self._sampled[pid] = max(self._sampled[pid], procs.rss_kib(pid))
                except OSError:
                    pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak_mib(self) -> float:
        total = 0
        for pid in self.pids:
            peak = self._sampled[pid]
            if self._hwm_reset:
                try:
                    peak = max(peak, procs.peak_rss_kib(pid))
                except OSError:
                    pass
            total += peak
        return total / 1024


def download(port: int, path: str, expected_bytes: int) -> None:
    """One GET with curl on the load core; the body goes to /dev/null, its size is checked."""
    argv = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--noproxy",
        "*",
        "-w",
        "%{http_code} %{size_download}",
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(
        procs.pinned(procs.LOAD_CORE, argv),
        capture_output=True,
        text=True,
        timeout=DOWNLOAD_TIMEOUT_SECONDS,
        check=False,
    )
    status, _, size = done.stdout.partition(" ")
    if status != "200" or int(size or 0) != expected_bytes:
        raise RuntimeError(f"download {path}: status {status}, {size} of {expected_bytes} bytes")


def timed_downloads(port: int, path: str, expected_bytes: int, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        download(port, path, expected_bytes)
    return time.perf_counter() - started


def time_to_first_response(port: int, started: float, path: str = "/small") -> float:
    """Seconds from process start to the first 200 answer on `path`."""
    deadline = started + STARTUP_TIMEOUT_SECONDS
    while time.perf_counter() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(STARTUP_POLL_SECONDS)
    raise TimeoutError(f"no 200 on :{port}{path} within {STARTUP_TIMEOUT_SECONDS}s")
