"""The command line: exit codes and messages, the way operators and other tools call it."""

from __future__ import annotations

import os
import shlex
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from proxy import __version__
from proxy.cli import build_parser, effective_server, uvicorn_options
from proxy.config import parse_config
from proxy.healthcheck import probe_for
from tests.conftest import free_port
from tests.pki import Pki
from tests.servers import running_proxy

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


@pytest.mark.parametrize(
    "command", ["serve", "check-config", "healthcheck", "demo", "simulate-backend"]
)
def test_each_command_help_says_what_it_does(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pollguard <command> --help` opens with a description, and states each default once."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    description = out.split("\n\n")[1]
    assert not description.startswith(("options:", "positional arguments:"))
    assert len(description.split()) >= 10
    for line in out.splitlines():
        assert line.count("(default") <= 1, line
    assert "(default: None)" not in out and "(default: False)" not in out


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


@contextmanager
def serving(command: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `command` until it answers /-/health on `port`; yield its base URL, then stop it."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline and status is None:
            assert process.poll() is None, f"{command} exited with {process.returncode}"
            try:
                status = httpx.get(f"{url}/-/health", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.05)  # not listening yet
        assert status == 200
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def readme_uvicorn_command() -> list[str]:
    """The plain-uvicorn command line README documents, as arguments."""
    text = (REPO / "README.md").read_text()
    start = text.index("uvicorn --factory")
    end = text.index("\n", start)
    while text[end - 1] == "\\":
        end = text.index("\n", end + 1)
    return shlex.split(text[start:end].replace("\\\n", " "), comments=True)


def test_readme_uvicorn_command_reproduces_serve(tmp_path: Path) -> None:
    """README's `uvicorn --factory` line serves like `pollguard serve`: one Server and one Date header, the upstream's, and pollguard's own X-Forwarded-For."""
    from tests.servers import ThreadedServer
    from tests.upstream_app import create_upstream_app

    command = readme_uvicorn_command()
    assert command[:3] == ["uvicorn", "--factory", "proxy.app:create_app"]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    config = tmp_path / "c.yaml"
    app, _ = create_upstream_app()
    with ThreadedServer(app) as upstream:
        config.write_text(f"upstream:\n  url: {upstream.url}\n")
        with serving(
            [sys.executable, "-m", *command], port, env={"POLLGUARD_CONFIG": str(config)}
        ) as url:
            response = httpx.get(f"{url}/headers", headers={"x-forwarded-for": "6.6.6.6"})
    assert response.status_code == 200
    assert response.headers.get_list("server") == ["uvicorn"]
    assert len(response.headers.get_list("date")) == 1
    sent = dict(response.json()["headers"])
    assert sent["x-forwarded-for"] == "127.0.0.1"  # the client's spoofed value replaced


def test_serve_listens_where_the_config_says(tmp_path: Path) -> None:
    """Without --host/--port, serve listens on server.host and server.port from the file."""
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"upstream:\n  url: http://127.0.0.1:{free_port()}\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  log_level: warning\n"
    )
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    with serving(command, port) as url:
        assert httpx.get(f"{url}/-/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"host": "0.0.0.0", "port": 9000, "workers": 2, "log_level": "warning"}),
        (
            ["--host", "127.0.0.2", "--port", "9100", "--workers", "3", "--log-level", "debug"],
            {"host": "127.0.0.2", "port": 9100, "workers": 3, "log_level": "debug"},
        ),
        (["--port", "9200"], {"host": "0.0.0.0", "port": 9200, "workers": 2}),
    ],
    ids=["file only", "every flag", "one flag"],
)
def test_flags_override_the_config_file(flags: list[str], expected: dict[str, object]) -> None:
    """A serve flag given wins over the file's server setting; one left out keeps the file's."""
    server = parse_config(
        "upstream: {url: 'http://b'}\n"
        "server: {host: 0.0.0.0, port: 9000, workers: 2, log_level: warning, access_log: true}\n",
        env={},
    ).server
    args = build_parser().parse_args(["serve", *flags])
    effective = effective_server(server, args)
    assert {name: getattr(effective, name) for name in expected} == expected
    assert effective.access_log is True


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "argument --port: must be <= 65535, got '70000'"),
        ("--port", "http", "argument --port: expected a whole number, got 'http'"),
        ("--workers", "0", "argument --workers: must be >= 1, got '0'"),
        ("--log-level", "loud", "argument --log-level: invalid choice: 'loud'"),
    ],
)
def test_bad_serve_flags_are_checked_like_the_config(flag: str, value: str, message: str) -> None:
    """A serve flag is validated by its config field's own rules: exit 2, naming the flag."""
    result = pollguard("serve", flag, value)
    assert result.returncode == 2
    assert message in result.stderr


def test_uvicorn_options_follow_the_server_section(pki: Pki) -> None:
    """shutdown_timeout and tls reach uvicorn; ca_file requires client certificates; uvicorn's
    access line is off whatever the config says (pollguard writes its own)."""
    config = parse_config(
        "upstream: {url: 'http://b'}\n"
        "server:\n  access_log: true\n  shutdown_timeout: 5s\n"
        f"  tls: {{cert_file: {pki.proxy.cert_file}, key_file: {pki.proxy.key_file}, "
        f"ca_file: {pki.ca_file}}}\n",
        env={},
    )
    options = uvicorn_options(config.server, config.websocket)
    assert options["access_log"] is False
    assert options["timeout_graceful_shutdown"] == 5.0
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (
        pki.proxy.cert_file,
        pki.proxy.key_file,
    )
    assert (options["ssl_ca_certs"], options["ssl_cert_reqs"]) == (pki.ca_file, ssl.CERT_REQUIRED)
    assert (options["proxy_headers"], options["server_header"], options["date_header"]) == (
        False,
        False,
        False,
    )
    bare = parse_config("upstream: {url: 'http://b'}\n", env={})
    plain = uvicorn_options(bare.server, bare.websocket)
    assert plain["access_log"] is False
    assert not any(name.startswith("ssl_") for name in plain)


def test_check_config_shows_the_server_section_and_checks_workers(tmp_path: Path) -> None:
    """check-config prints server.* as loaded, and refuses server.workers > 1 without Redis."""
    config = tmp_path / "c.yaml"
    config.write_text("upstream:\n  url: http://127.0.0.1:5000\nserver:\n  port: 9000\n")
    shown = pollguard("check-config", str(config))
    config.write_text("upstream:\n  url: http://127.0.0.1:5000\nserver:\n  workers: 2\n")
    refused = pollguard("check-config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "  port: 9000\n" in shown.stdout and "  access_log: false\n" in shown.stdout
    assert refused.returncode == 2
    assert "state.redis_url: not set, but 2 workers were requested" in refused.stderr


def test_check_config_names_a_missing_tls_file(tmp_path: Path) -> None:
    """A server.tls file that does not exist: exit 2 naming the field and the path."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "upstream:\n  url: http://127.0.0.1:5000\n"
        f"server:\n  tls:\n    cert_file: {tmp_path}/cert.pem\n    key_file: {tmp_path}/key.pem\n"
    )
    result = pollguard("check-config", str(config))
    assert result.returncode == 2
    assert f"server.tls.cert_file: no file at '{tmp_path}/cert.pem'" in result.stderr
    assert "Traceback" not in result.stderr


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


@pytest.mark.parametrize(
    ("server", "admin", "url"),
    [
        ("{}", "{}", "http://127.0.0.1:8080/-/health"),
        ("{host: 0.0.0.0, port: 9000}", "{prefix: /_pg/}", "http://127.0.0.1:9000/_pg/health"),
        ("{host: '::', port: 9001}", "{}", "http://[::1]:9001/-/health"),
        ("{host: 10.1.2.3}", "{}", "http://10.1.2.3:8080/-/health"),
    ],
)
def test_healthcheck_probes_where_serve_listens(server: str, admin: str, url: str) -> None:
    """The probe takes port, prefix and scheme from the config; wildcard addresses go to loopback."""
    config = parse_config(
        f"upstream: {{url: 'http://b'}}\nserver: {server}\nadmin: {admin}\n", env={}
    )
    assert probe_for(config).url == url


def test_healthcheck_probes_https_when_serve_does(pki: Pki) -> None:
    """With server.tls the probe speaks https."""
    config = parse_config(
        "upstream: {url: 'http://b'}\n"
        f"server: {{tls: {{cert_file: {pki.proxy.cert_file}, key_file: {pki.proxy.key_file}}}}}\n",
        env={},
    )
    assert probe_for(config).url == "https://127.0.0.1:8080/-/health"


def test_healthcheck_exit_codes_follow_the_live_process(tmp_path: Path) -> None:
    """0 while pollguard serves (address from the config file, as a container's HEALTHCHECK
    finds it), 1 naming the URL once it is gone, 2 for a config it cannot read."""
    port = free_port()
    config_file = tmp_path / "pollguard.yaml"
    config_file.write_text(
        f"upstream: {{url: 'http://127.0.0.1:9'}}\nserver: {{host: 0.0.0.0, port: {port}}}\n"
    )
    with running_proxy({"upstream": {"url": "http://127.0.0.1:9"}}, port=port):
        alive = pollguard("healthcheck", "--config", str(config_file))
    gone = pollguard("healthcheck", "--config", str(config_file), "--timeout", "0.5")
    broken = pollguard("healthcheck", env={"POLLGUARD_CONFIG": str(tmp_path / "missing.yaml")})
    assert (alive.returncode, alive.stderr) == (0, "")
    assert gone.returncode == 1
    assert f"unhealthy: http://127.0.0.1:{port}/-/health" in gone.stderr
    assert broken.returncode == 2 and "missing.yaml" in broken.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_healthcheck_timeout_must_be_a_sane_number_of_seconds(value: str) -> None:
    """A bad --timeout is exit 2 naming the flag, not a traceback from the socket layer."""
    result = pollguard("healthcheck", "--timeout", value)
    assert result.returncode == 2
    assert "argument --timeout:" in result.stderr and "Traceback" not in result.stderr
