"""How `pollguard serve` runs uvicorn: as `uvicorn.run` would, except that with several workers
the supervisor is pollguard's, which forwards SIGHUP to its workers (each reloads its config,
see proxy.reload) instead of replacing them all, which would drop their connections.

Everything else is uvicorn's Multiprocess: SIGINT/SIGTERM drain and stop the workers, a worker
that dies is replaced, SIGTTIN/SIGTTOU add or remove one.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from proxy.metrics_export import METRICS_DIR_ENV, forget_worker
from proxy.reload import SERVE_ENV, SUPERVISOR_ENV

logger = logging.getLogger("uvicorn.error")

READY_PING_SECONDS = 1.0  # asking a worker that has not served yet whether it does now


class ReloadingSupervisor(Multiprocess):
    """uvicorn's Multiprocess, with SIGHUP sent on to every worker that serves. A worker still
    starting is sent it once it serves (it loaded the file at its start, maybe before the
    change); one started after the SIGHUP reads the file as it is and is not sent it."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        self._owed: list[Process] = []  # workers the last SIGHUP has not reached yet
        self._serving: set[int] = set()  # pids known to have finished startup

    def handle_hup(self) -> None:
        logger.info(
            "Received SIGHUP, asking %d worker(s) to reload the config.", len(self.processes)
        )
        self._owed = list(self.processes)
        self._forward_owed()

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        # A replaced worker's live gauges (open WebSockets…) no longer count; its counters do.
        for pid in before - {process.pid for process in self.processes}:
            if pid is not None:
                forget_worker(pid)
        if self._owed:
            self._forward_owed()

    def _forward_owed(self) -> None:
        owed: list[Process] = []
        self._serving &= {process.pid for process in self.processes if process.pid is not None}
        for process in self._owed:
            pid = process.pid
            if pid is None or process not in self.processes or not process.process.is_alive():
                continue  # replaced: its successor reads the file as it is now
            if pid not in self._serving:
                if not process.is_ready(timeout=READY_PING_SECONDS):
                    owed.append(process)
                    continue
                self._serving.add(pid)
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                continue
        self._owed = owed


def serve(app: str, options: dict[str, Any]) -> None:
    """`uvicorn.run(app, factory=True, **options)`, with pollguard's supervisor for several
    workers (the same steps as uvicorn.run's multiprocess branch)."""
    os.environ[SERVE_ENV] = "1"
    if options.get("workers", 1) <= 1:
        uvicorn.run(app, factory=True, **options)
        return
    config = uvicorn.Config(app, factory=True, **options)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    # Each worker writes its metrics into this directory, and a scrape of any of them sums all
    # (proxy.metrics_export). Fresh for this run, so no earlier run's counts are summed.
    with tempfile.TemporaryDirectory(prefix="pollguard-metrics-") as metrics_dir:
        os.environ[METRICS_DIR_ENV] = metrics_dir
        sock = config.bind_socket()
        try:
            ReloadingSupervisor(config, sockets=[sock]).run()
        except KeyboardInterrupt:  # pragma: no cover - as uvicorn.run
            pass
        finally:
            sock.close()
