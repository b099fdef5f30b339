"""Start and stop the demo's moving parts: the simulator in a background thread, and pollguard
as a subprocess started exactly the way users start it."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
import yaml

import proxy
from proxy.server_ws import WS_PROTOCOL_PATH

LOOPBACK = "127.0.0.1"
DEFAULT_START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
READINESS_POLL_SECONDS = 0.05
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    """A server did not become ready before its deadline."""


class ThreadedServer:
    """An ASGI app under uvicorn on a loopback port, in a daemon thread of this process."""

    def __init__(self, app: Any, port: int | None = None, **options: Any) -> None:
        """`options` go to uvicorn.Config as they are: `ssl_certfile=…, ssl_keyfile=…` serve HTTPS.
        WebSockets get pollguard's server protocol unless `ws=` says otherwise: uvicorn's own
        logs an ERROR line for every handshake the app refuses with an HTTP answer (the
        simulator's status feed refuses 401/404 that way)."""
        self.port = port if port is not None else free_port()
        options.setdefault("ws", WS_PROTOCOL_PATH)
        self.config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            **options,
        )
        self._scheme = "https" if options.get("ssl_certfile") else "http"
        self._server = uvicorn.Server(self.config)
        self._thread = threading.Thread(
            target=self._server.run, name=f"sim-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"{self._scheme}://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_SECONDS) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServerStartError(f"simulator on port {self.port} exited during startup")
            if time.monotonic() > deadline:
                raise ServerStartError(f"simulator on port {self.port} not ready in {timeout}s")
            time.sleep(READINESS_POLL_SECONDS / 5)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()  # `with` never calls __exit__ when __enter__ raises
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


class PollguardProcess:
    """`python -m proxy serve` with a generated config file, on a free loopback port."""

    def __init__(
        self,
        config: dict[str, Any],
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`client_tls`: for a config with server.tls, the context a client trusting pollguard's
        certificate uses (its health is checked over https:// with it)."""
        self.config = config
        self.port = port if port is not None else free_port()
        self._extra_env = extra_env or {}
        self.client_tls = client_tls
        self._workdir = tempfile.TemporaryDirectory(prefix="pollguard-demo-")
        self.config_path = Path(self._workdir.name) / "pollguard.yaml"
        self.log_path = Path(self._workdir.name) / "pollguard.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.client_tls is None else "https"
        return f"{scheme}://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(self.config_path),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_SECONDS) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = {**os.environ, **self._extra_env}
        # The child must import this very `proxy` package even when it was never installed.
        source_root = str(Path(proxy.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._wait_until_healthy(timeout)

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=0.5, verify=self.client_tls or True) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise ServerStartError(
                        f"pollguard exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/-/health").status_code == 200:
                        return
                time.sleep(READINESS_POLL_SECONDS)
        self.stop()
        raise ServerStartError(f"pollguard not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_SECONDS)

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # `with` never calls __exit__ when __enter__ raises
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
