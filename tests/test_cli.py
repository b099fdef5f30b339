"""The command line: exit codes and messages, the way operators and other tools call it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from proxy import __version__
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def pollguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    """--version prints the package version."""
    result = pollguard("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pollguard {__version__}"


def test_check_config_accepts_the_shipped_config_and_masks_secrets() -> None:
    """check-config on config.yaml exits 0 and prints the effective config with the admin token masked."""
    result = pollguard(
        "check-config", str(REPO / "config.yaml"), env={"POLLGUARD_ADMIN_TOKEN": "s3cret-token"}
    )
    assert result.returncode == 0, result.stderr
    assert "stuck_after: 5m" in result.stdout
    assert "s3cret-token" not in result.stdout
    assert "***" in result.stdout


def test_check_config_rejects_with_field_value_and_fix(tmp_path: Path) -> None:
    """An invalid config exits 2 and names the field, the bad value and the fix."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream:\n  url: http://127.0.0.1:5000\n  read_timeout: soon\n")
    result = pollguard("check-config", str(bad))
    assert result.returncode == 2
    assert "upstream.read_timeout" in result.stderr
    assert "soon" in result.stderr
    assert "2s" in result.stderr or "5m" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_several_workers_with_the_memory_store(tmp_path: Path) -> None:
    """--workers 2 without state.redis_url exits 2 and suggests state.redis_url."""
    config = tmp_path / "c.yaml"
    config.write_text("upstream:\n  url: http://127.0.0.1:5000\n")
    result = pollguard(
        "serve", "--config", str(config), "--workers", "2", "--port", str(free_port())
    )
    assert result.returncode == 2
    assert "state.redis_url" in result.stderr


def test_serve_without_config_exits_2() -> None:
    """serve with neither --config nor POLLGUARD_CONFIG says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "POLLGUARD_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "POLLGUARD_CONFIG" in result.stderr


def test_serve_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist is a config error, not a traceback."""
    result = pollguard("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_asgi_factory_serves_under_plain_uvicorn(tmp_path: Path) -> None:
    """`uvicorn --factory proxy.app:create_app` with POLLGUARD_CONFIG answers /-/health."""
    config = tmp_path / "c.yaml"
    config.write_text(f"upstream:\n  url: http://127.0.0.1:{free_port()}\n")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "proxy.app:create_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "POLLGUARD_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.05)
        assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_sigterm_lets_the_process_exit_cleanly(tmp_path: Path) -> None:
    """SIGTERM runs the lifespan shutdown (pool closed) and ends the process without a traceback."""
    from tests.servers import ProxyProcess

    with ProxyProcess({"upstream": {"url": f"http://127.0.0.1:{free_port()}"}}) as proxy:
        assert proxy.process is not None
        proxy.stop()  # SIGTERM
        logs = proxy.logs()
        # uvicorn re-raises the signal after a graceful shutdown, so the exit status says "SIGTERM".
        assert proxy.process.returncode in (0, -15)
    assert "Application shutdown complete" in logs
    assert "Traceback" not in logs
