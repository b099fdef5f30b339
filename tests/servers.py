"""Real servers for integration tests, built on the demo's launchers (proxy.demo.servers): an
upstream app under uvicorn in a thread, and pollguard as a `python -m proxy serve` process."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from proxy.demo.servers import PollguardProcess, ThreadedServer

TEST_LOG_LEVEL = "info"  # the decision log lines are part of what some tests assert


class ProxyProcess(PollguardProcess):
    """PollguardProcess logging decisions, with its log and memory readable by tests."""

    def command(self) -> list[str]:
        return [*super().command()[:-1], TEST_LOG_LEVEL]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")


@contextmanager
def running_proxy(config: dict[str, Any], **options: Any) -> Iterator[ProxyProcess]:
    """pollguard serving `config`; `options` as PollguardProcess takes them (client_tls…)."""
    with ProxyProcess(config, **options) as proxy:
        yield proxy


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as-is (for request targets no client library would send) and read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["ProxyProcess", "ThreadedServer", "raw_request", "running_proxy"]
