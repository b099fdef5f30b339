"""proxy.config: validation messages, env interpolation, durations, defaults, warnings, render."""

from __future__ import annotations

import re
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from proxy.app import guard_rules
from proxy.config import (
    Config,
    RouteConfig,
    format_duration,
    format_size,
    load_config,
    parse_config,
)
from proxy.config_loading import parse_size
from proxy.config_report import check_workers, config_warnings, render_config
from proxy.errors import ConfigError
from tests.pki import Pki

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
SOURCE = "config.yaml"
DELETE = object()
DURATION_FIX = "use a number of seconds or a value like 250ms, 2s, 5m, 1h"
UPSTREAM_KEYS = (
    "url, connect_timeout, read_timeout, pool_size, max_connections, pool_timeout, "
    "max_head_size, max_header_fields, read_ahead, preserve_host, trusted_proxies, tls"
)


def _valid() -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:5000"},
        "jobs": {"recording": {"reprepare": {"path": "/api/recordings/{call_sid}/prepare"}}},
        "routes": [
            {"path": "/api/recordings/file/{call_sid}", "job": "recording", "key": "{call_sid}"}
        ],
    }


def _with(changes: dict[str, Any]) -> dict[str, Any]:
    """The valid config with each dotted path (`routes.0.job`) set, or removed if DELETE."""
    data = _valid()
    for dotted, value in changes.items():
        *parents, last = [int(part) if part.isdigit() else part for part in dotted.split(".")]
        node: Any = data
        for part in parents:
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def _parse(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(yaml.safe_dump(data), env={} if env is None else env, source=SOURCE)


def _error_lines(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _parse(data)
    return str(caught.value).splitlines()


ERROR_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "missing url",
        {"upstream.url": DELETE},
        "upstream.url: field required — set the legacy backend's base URL, e.g. "
        "http://127.0.0.1:5000",
    ),
    (
        "missing upstream",
        {"upstream": DELETE},
        "upstream: field required — add an upstream section with the legacy backend's base URL, "
        "e.g. url: http://127.0.0.1:5000",
    ),
    (
        "bad url scheme",
        {"upstream.url": "ftp://backend"},
        "upstream.url: unsupported URL 'ftp://backend' — use an http:// or https:// URL, "
        "e.g. http://127.0.0.1:5000",
    ),
    (
        "url without host",
        {"upstream.url": "http://"},
        "upstream.url: no host in 'http://' — e.g. http://127.0.0.1:5000",
    ),
    (
        "url with query",
        {"upstream.url": "http://backend/?a=1"},
        "upstream.url: 'http://backend/?a=1' has a query or fragment — remove everything after "
        "? or #",
    ),
    (
        "bad duration",
        {"jobs.recording.stuck_after": "five minutes"},
        f"jobs.recording.stuck_after: invalid duration 'five minutes' — {DURATION_FIX}",
    ),
    (
        "framing header forwarded to the re-prepare",
        {"jobs.recording.reprepare.forward_headers": ["cookie", "Content-Length"]},
        "jobs.recording.reprepare.forward_headers: 'content-length' can't be forwarded — it "
        "frames or identifies the re-prepare request itself; remove it (forward e.g. "
        "authorization, cookie)",
    ),
    (
        "dot segment in the re-prepare path",
        {"jobs.recording.reprepare.path": "/api/recordings/../{call_sid}/prepare"},
        "jobs.recording.reprepare.path: path '/api/recordings/../{call_sid}/prepare' has a '.' "
        "or '..' segment — URL libraries remove those, so the request would go elsewhere; write "
        "the path without them",
    ),
    (
        "unknown duration unit",
        {"upstream.read_timeout": "5d"},
        f"upstream.read_timeout: invalid duration '5d' — {DURATION_FIX}",
    ),
    (
        "negative duration",
        {"state.timeout": "-5s"},
        f"state.timeout: duration must be greater than 0, got '-5s' — {DURATION_FIX}",
    ),
    (
        "zero duration",
        {"jobs.recording.reprepare.timeout": 0},
        f"jobs.recording.reprepare.timeout: duration must be greater than 0, got 0 — {DURATION_FIX}",
    ),
    (
        "unknown top-level key",
        {"colour": "red"},
        "colour: unknown key — remove it or check the spelling (valid keys: upstream, server, "
        "state, admin, websocket, logging, metrics, jobs, routes)",
    ),
    (
        "unknown nested key",
        {"upstream.colour": "red"},
        f"upstream.colour: unknown key — remove it or check the spelling (valid keys: "
        f"{UPSTREAM_KEYS})",
    ),
    (
        "unknown key in reprepare",
        {"jobs.recording.reprepare.metod": "GET"},
        "jobs.recording.reprepare.metod: unknown key — remove it or check the spelling (valid "
        "keys: method, path, query, headers, forward_headers, timeout)",
    ),
    (
        "unknown key in route",
        {"routes.0.jobs": "recording"},
        "routes[0].jobs: unknown key — remove it or check the spelling (valid keys: path, methods, "
        "job, key)",
    ),
    (
        "bad redis url scheme",
        {"state.redis_url": "http://cache:6379"},
        "state.redis_url: unsupported Redis URL 'http://cache:6379' — use redis://, rediss:// or "
        "unix://, e.g. redis://127.0.0.1:6379/0, or leave it empty for the in-memory store",
    ),
    (
        "bad on_error",
        {"state.on_error": "ignore"},
        "state.on_error: invalid value 'ignore' — use 'pass' or 'fail'",
    ),
    (
        "bad log format",
        {"logging.format": "xml"},
        "logging.format: invalid value 'xml' — use 'text' or 'json'",
    ),
    (
        "bad mode",
        {"jobs.recording.mode": "dry-run"},
        "jobs.recording.mode: invalid value 'dry-run' — use 'enforce' or 'shadow'",
    ),
    (
        "admin prefix is slash",
        {"admin.prefix": "/"},
        "admin.prefix: invalid prefix '/' — it must start and end with '/' and not be '/' alone, "
        "e.g. /-/",
    ),
    (
        "admin prefix without trailing slash",
        {"admin.prefix": "/admin"},
        "admin.prefix: invalid prefix '/admin' — it must start and end with '/' and not be '/' "
        "alone, e.g. /-/",
    ),
    ("pool size zero", {"upstream.pool_size": 0}, "upstream.pool_size: must be >= 1, got 0"),
    (
        "pool size not a number",
        {"upstream.pool_size": "many"},
        "upstream.pool_size: expected a whole number, got 'many'",
    ),
    (
        "negative max_reprepares",
        {"jobs.recording.max_reprepares": -1},
        "jobs.recording.max_reprepares: must be >= 0, got -1",
    ),
    (
        "bad trusted proxy",
        {"upstream.trusted_proxies": ["10.0.0.0/8", "gateway"]},
        "upstream.trusted_proxies[1]: invalid IP address or network 'gateway' — use an address "
        "like 10.0.0.1 or a CIDR like 10.0.0.0/8",
    ),
    (
        "route job missing",
        {"routes.0.job": "recordings"},
        "routes[0].job: unknown job 'recordings' — define it under jobs or use a defined job "
        "(recording)",
    ),
    (
        "key param not a route param",
        {"routes.0.key": "{call_id}"},
        "routes[0].key: {call_id} is not a path parameter of route "
        "'/api/recordings/file/{call_sid}' — use one of its parameters ({call_sid}) or add "
        "{call_id} to the route path",
    ),
    (
        "reprepare.path param not a route param",
        {"jobs.recording.reprepare.path": "/api/{account}/recordings/{call_sid}/prepare"},
        "jobs.recording.reprepare.path: {account} is not a path parameter of route "
        "'/api/recordings/file/{call_sid}' — use one of its parameters ({call_sid}) or add "
        "{account} to the route path (routes[0] uses job recording)",
    ),
    (
        "retry_after above max",
        {"jobs.recording.retry_after": "1m"},
        "jobs.recording.retry_after: 1m is greater than retry_after_max (30s) — lower retry_after "
        "or raise retry_after_max",
    ),
    (
        "retry_after_reprepared above max",
        {"jobs.recording.retry_after_max": "2s", "jobs.recording.retry_after": 1},
        "jobs.recording.retry_after_reprepared: 3s is greater than retry_after_max (2s) — lower "
        "retry_after_reprepared or raise retry_after_max",
    ),
    (
        "bad regex",
        {"jobs.recording.key_pattern": "^CA[0-9"},
        "jobs.recording.key_pattern: invalid regular expression '^CA[0-9': unterminated character "
        "set at position 3 — fix the pattern (Python re syntax)",
    ),
    (
        "pending_status out of range",
        {"jobs.recording.pending_status": [202, 99]},
        "jobs.recording.pending_status[1]: must be >= 100, got 99",
    ),
    (
        "pending_status above 599",
        {"jobs.recording.pending_status": [600]},
        "jobs.recording.pending_status[0]: must be <= 599, got 600",
    ),
    (
        "pending_status empty",
        {"jobs.recording.pending_status": []},
        "jobs.recording.pending_status: must not be empty — list at least one value",
    ),
    (
        "pending_status not a list",
        {"jobs.recording.pending_status": "202s"},
        "jobs.recording.pending_status: expected a list, got '202s'",
    ),
    (
        "missing reprepare.path",
        {"jobs.recording.reprepare.path": DELETE},
        "jobs.recording.reprepare.path: field required — set the backend path that forces the job "
        "to be prepared again, e.g. /api/recordings/{call_sid}/prepare",
    ),
    (
        "missing reprepare section",
        {"jobs.recording.reprepare": DELETE},
        "jobs.recording.reprepare: field required — add a reprepare section whose path forces the "
        "job to be prepared again, e.g. path: /api/recordings/{call_sid}/prepare",
    ),
    (
        "reprepare.path without slash",
        {"jobs.recording.reprepare.path": "prepare"},
        "jobs.recording.reprepare.path: path 'prepare' must start with '/' — e.g. "
        "/api/recordings/{call_sid}",
    ),
    (
        "route path without slash",
        {"routes.0.path": "api/recordings/{call_sid}"},
        "routes[0].path: path 'api/recordings/{call_sid}' must start with '/' — e.g. "
        "/api/recordings/{call_sid}",
    ),
    (
        "route param not an identifier",
        {"routes.0.path": "/api/{1st}"},
        "routes[0].path: invalid parameter {1st} in '/api/{1st}' — a parameter is {name} where "
        "name is letters, digits and underscores, not starting with a digit",
    ),
    (
        "duplicate route param",
        {"routes.0.path": "/api/{call_sid}/{call_sid}"},
        "routes[0].path: duplicate parameter {call_sid} in '/api/{call_sid}/{call_sid}' — give "
        "each parameter its own name",
    ),
    (
        "unbalanced brace in route path",
        {"routes.0.path": "/api/{call_sid"},
        "routes[0].path: unbalanced brace in '/api/{call_sid' — write parameters as {name}, "
        "braces paired",
    ),
    (
        "missing route job",
        {"routes.0.job": DELETE},
        "routes[0].job: field required — name the job (a key under jobs) that tracks this route",
    ),
    (
        "bad route method",
        {"routes.0.methods": ["GET", "GE T"]},
        "routes[0].methods[1]: invalid HTTP method 'GE T' — use letters, digits or !#$%&'*+-.^_`|~",
    ),
    (
        "query value not a scalar",
        {"jobs.recording.reprepare.query": {"force": [1]}},
        "jobs.recording.reprepare.query.force: expected a text value (quote it), got [1]",
    ),
    (
        "section not a mapping",
        {"state": ["redis://x"]},
        "state: expected a mapping, got ['redis://x']",
    ),
    ("port zero", {"server.port": 0}, "server.port: must be >= 1, got 0"),
    ("port too large", {"server.port": 65536}, "server.port: must be <= 65535, got 65536"),
    ("no workers", {"server.workers": 0}, "server.workers: must be >= 1, got 0"),
    (
        "bad log level",
        {"server.log_level": "verbose"},
        "server.log_level: invalid value 'verbose' — use 'critical', 'error', 'warning', 'info' "
        "or 'debug'",
    ),
    (
        "host with a scheme",
        {"server.host": "http://0.0.0.0"},
        "server.host: invalid host 'http://0.0.0.0' — an address to listen on, e.g. 127.0.0.1, "
        "0.0.0.0 or ::",
    ),
    (
        "access_log not a boolean",
        {"server.access_log": "sometimes"},
        "server.access_log: expected true or false, got 'sometimes'",
    ),
    (
        "upstream tls for an http url",
        {"upstream.tls": {"verify": False}},
        "upstream.tls: set, but url 'http://127.0.0.1:5000' is not https:// — TLS settings apply "
        "to an https:// upstream only; use an https:// URL or remove upstream.tls",
    ),
    (
        "server_name with scheme and port",
        {"upstream.url": "https://10.0.0.5", "upstream.tls.server_name": "https://backend:443"},
        "upstream.tls.server_name: invalid server_name 'https://backend:443' — a DNS name the "
        "upstream's certificate is issued for, without scheme, port or path, e.g. backend.internal",
    ),
    (
        "unknown key in server.tls",
        {"server.tls.certfile": "/etc/cert.pem"},
        "server.tls.certfile: unknown key — remove it or check the spelling (valid keys: "
        "cert_file, key_file, ca_file)",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [pytest.param(changes, expected, id=name) for name, changes, expected in ERROR_CASES],
)
def test_invalid_config_is_reported_with_path_value_and_fix(
    changes: dict[str, Any], expected: str
) -> None:
    """Each invalid setting yields exactly one human line: source, dotted path, value, fix."""
    assert _error_lines(_with(changes)) == [f"{SOURCE}: {expected}"]


def test_every_problem_is_reported_one_per_line() -> None:
    """Several independent mistakes are all reported in one error, one line each."""
    lines = _error_lines(_with({"upstream.url": "ftp://x", "state.timeout": "soon", "oops": 1}))
    assert [line.split(": ")[1] for line in lines] == ["upstream.url", "state.timeout", "oops"]


# TLS files: `{name}` is a file of the test's PKI (tests/pki.py) or its directory.
TLS_FILE_CASES: list[tuple[str, dict[str, str], str]] = [
    (
        "certificate without key",
        {"server.tls.cert_file": "{proxy_cert}"},
        "server.tls.key_file: required with cert_file — to serve HTTPS pollguard needs both the "
        "certificate and its private key (both may name one PEM file holding the two)",
    ),
    (
        "key without certificate",
        {"server.tls.key_file": "{proxy_key}"},
        "server.tls.cert_file: required with key_file — to serve HTTPS pollguard needs both the "
        "certificate and its private key (both may name one PEM file holding the two)",
    ),
    (
        "client CA without certificate",
        {"server.tls.ca_file": "{ca}"},
        "server.tls.ca_file: set without cert_file — client certificates can only be required "
        "over TLS; set cert_file and key_file too, or remove ca_file",
    ),
    (
        "missing certificate file",
        {"server.tls.cert_file": "{dir}/nope.pem", "server.tls.key_file": "{proxy_key}"},
        "server.tls.cert_file: no file at '{dir}/nope.pem' — give the path of an existing PEM file",
    ),
    (
        "key path is a directory",
        {"server.tls.cert_file": "{proxy_cert}", "server.tls.key_file": "{dir}"},
        "server.tls.key_file: '{dir}' is a directory — give the path of a PEM file",
    ),
    (
        "a key where the certificate goes",
        {"server.tls.cert_file": "{proxy_key}", "server.tls.key_file": "{proxy_key}"},
        "server.tls.cert_file: '{proxy_key}' holds no usable PEM certificate ([X509: "
        "NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found) — give the certificate in PEM "
        "form (-----BEGIN CERTIFICATE-----)",
    ),
    (
        "key of another certificate",
        {"server.tls.cert_file": "{proxy_cert}", "server.tls.key_file": "{client_key}"},
        "server.tls.key_file: '{client_key}' is not the private key of cert_file '{proxy_cert}', "
        "or not an unencrypted PEM key ([X509: KEY_VALUES_MISMATCH] key values mismatch) — give "
        "the key the certificate was issued for, without a passphrase",
    ),
    (
        "upstream CA file that holds no certificate",
        {"upstream.url": "https://backend", "upstream.tls.ca_file": "{client_key}"},
        "upstream.tls.ca_file: '{client_key}' holds no usable PEM certificate ([X509: "
        "NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found) — give the certificate in PEM "
        "form (-----BEGIN CERTIFICATE-----)",
    ),
    (
        "client certificate without key",
        {"upstream.url": "https://backend", "upstream.tls.cert_file": "{client_cert}"},
        "upstream.tls.key_file: required with cert_file — to present a client certificate "
        "pollguard needs both the certificate and its private key (both may name one PEM file "
        "holding the two)",
    ),
]


def _pki_files(pki: Pki) -> dict[str, str]:
    return {
        "ca": pki.ca_file,
        "dir": str(Path(pki.ca_file).parent),
        "proxy_cert": pki.proxy.cert_file,
        "proxy_key": pki.proxy.key_file,
        "client_cert": pki.client.cert_file,
        "client_key": pki.client.key_file,
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [pytest.param(changes, expected, id=name) for name, changes, expected in TLS_FILE_CASES],
)
def test_tls_files_are_checked_at_load(pki: Pki, changes: dict[str, str], expected: str) -> None:
    """A TLS file that is missing, unpaired, or can't be loaded is named by its field, with the reason and the fix."""
    files = _pki_files(pki)
    changed = {path: value.format(**files) for path, value in changes.items()}
    assert _error_lines(_with(changed)) == [f"{SOURCE}: {expected.format(**files)}"]


def test_valid_tls_settings_load_and_render_back(pki: Pki, tmp_path: Path) -> None:
    """server.tls and upstream.tls with usable files load, and render to YAML that loads back equal; a combined PEM (key and certificate in one file) serves as both."""
    combined = tmp_path / "client-combined.pem"
    combined.write_text(
        Path(pki.client.key_file).read_text() + Path(pki.client.cert_file).read_text()
    )
    cfg = _parse(
        _with(
            {
                "upstream.url": "https://10.0.0.5:8443",
                "upstream.tls": {
                    "ca_file": pki.ca_file,
                    "cert_file": str(combined),
                    "key_file": str(combined),
                    "server_name": "backend.internal",
                },
                "server.tls": {
                    "cert_file": pki.proxy.cert_file,
                    "key_file": pki.proxy.key_file,
                    "ca_file": pki.ca_file,
                },
            }
        )
    )
    assert cfg.server.tls.enabled
    assert (cfg.upstream.tls.verify, cfg.upstream.tls.server_name) == (True, "backend.internal")
    assert parse_config(render_config(cfg), env={}) == cfg


def test_blank_tls_paths_mean_unset() -> None:
    """An empty TLS path (an unset `${VAR:-}`) is no file: TLS off on that side."""
    cfg = _parse(
        _with(
            {
                "upstream.url": "https://backend",
                "upstream.tls": {"ca_file": "${UPSTREAM_CA:-}", "server_name": ""},
                "server.tls": {"cert_file": "", "key_file": " "},
            }
        )
    )
    assert (cfg.upstream.tls.ca_file, cfg.upstream.tls.server_name) == (None, None)
    assert not cfg.server.tls.enabled


def test_render_leaves_out_upstream_tls_for_http() -> None:
    """upstream.tls is rendered under an https:// URL only, so the output always loads back."""
    plain = yaml.safe_load(render_config(_parse(_valid())))
    secure = yaml.safe_load(render_config(_parse(_with({"upstream.url": "https://b"}))))
    assert "tls" not in plain["upstream"]
    assert secure["upstream"]["tls"]["verify"] is True
    assert plain["server"]["tls"] == {"cert_file": None, "key_file": None, "ca_file": None}


def test_workers_above_one_need_redis() -> None:
    """check_workers refuses several workers sharing nothing, and names the fix."""
    cfg = _parse(_valid())
    with pytest.raises(ConfigError) as caught:
        check_workers(cfg, 4)
    message = str(caught.value)
    assert message.startswith("state.redis_url: not set, but 4 workers were requested")
    assert "split between the 4 processes" in message
    assert "set state.redis_url" in message and "or run 1 worker" in message


@pytest.mark.parametrize(
    ("redis_url", "workers"), [(None, 1), ("redis://127.0.0.1:6379/0", 1), ("redis://r", 8)]
)
def test_workers_accepted_when_state_is_shared_or_single(
    redis_url: str | None, workers: int
) -> None:
    """One worker, or any number of workers with Redis, passes check_workers without raising."""
    check_workers(_parse(_with({"state.redis_url": redis_url})), workers)


def test_unset_env_var_without_default_is_an_error_naming_it() -> None:
    """`${VAR}` with VAR unset fails, naming the variable and the field it was used in."""
    with pytest.raises(ConfigError) as caught:
        parse_config("upstream:\n  url: ${BACKEND_URL}\n", env={}, source=SOURCE)
    assert str(caught.value) == (
        "config.yaml: upstream.url: environment variable BACKEND_URL is not set — export "
        "BACKEND_URL, or give a default like ${BACKEND_URL:-value}"
    )


def test_malformed_env_reference_is_an_error() -> None:
    """A `${` that is not a well-formed reference is reported instead of kept literally."""
    with pytest.raises(ConfigError) as caught:
        parse_config("upstream:\n  url: http://h/${HOST\n", env={}, source=SOURCE)
    assert str(caught.value).startswith(
        "config.yaml: upstream.url: malformed environment reference in 'http://h/${HOST'"
    )


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("http://${HOST}:5000", {"HOST": "backend"}, "http://backend:5000"),
        ("http://${HOST:-localhost}:5000", {}, "http://localhost:5000"),
        ("http://${HOST:-localhost}:5000", {"HOST": ""}, "http://localhost:5000"),
        ("http://${HOST:-localhost}:5000", {"HOST": "backend"}, "http://backend:5000"),
        ("${SCHEME}://${HOST}:${PORT:-80}", {"SCHEME": "https", "HOST": "b"}, "https://b:80"),
        ("http://b/$${literal}", {}, "http://b/${literal}"),
    ],
    ids=[
        "set",
        "default-when-unset",
        "default-when-empty",
        "set-beats-default",
        "several",
        "escaped",
    ],
)
def test_env_interpolation_in_string_values(
    template: str, env: dict[str, str], expected: str
) -> None:
    """`${VAR}` and `${VAR:-default}` (default when unset or empty, like the shell) expand."""
    cfg = parse_config(f"upstream:\n  url: {template}\n", env=env)
    assert cfg.upstream.url == expected


def test_env_interpolation_feeds_typed_fields_and_lists() -> None:
    """Interpolated text is validated like written text: numbers, durations, list items."""
    text = (
        "upstream:\n  url: http://b\n  pool_size: ${POOL:-7}\n  read_timeout: ${READ}\n"
        "  trusted_proxies: ['${PROXY}']\nstate:\n  redis_url: ${REDIS_URL:-}\n"
    )
    cfg = parse_config(text, env={"READ": "90s", "PROXY": "10.1.2.3"})
    assert cfg.upstream.pool_size == 7
    assert cfg.upstream.read_timeout == 90.0
    assert cfg.upstream.trusted_proxies == (ip_network("10.1.2.3/32"),)
    assert cfg.state.redis_url is None


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env mapping, os.environ is used."""
    monkeypatch.setenv("POLLGUARD_TEST_UPSTREAM", "http://from-environ:8080")
    cfg = parse_config("upstream:\n  url: ${POLLGUARD_TEST_UPSTREAM}\n")
    assert cfg.upstream.url == "http://from-environ:8080"


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5m", 90.0),
        (7, 7.0),
        (1.5, 1.5),
        ("10", 10.0),
        ("0.5", 0.5),
    ],
)
def test_duration_forms(written: object, seconds: float) -> None:
    """Durations with ms/s/m/h units, plain numbers and numeric strings become float seconds."""
    cfg = _parse(_with({"upstream.read_timeout": written}))
    assert cfg.upstream.read_timeout == seconds
    assert isinstance(cfg.upstream.read_timeout, float)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3600, "1h"),
        (7200, "2h"),
        (300, "5m"),
        (90, "90s"),
        (2, "2s"),
        (0.25, "250ms"),
        (1.5, "1500ms"),
        (0.0005, "0.0005"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """format_duration picks the largest exact unit, else plain seconds."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("written", "size"),
    [("512B", 512), ("64KiB", 65536), ("16MiB", 16 * 1024**2), ("1GiB", 1024**3), (4096, 4096)],
)
def test_size_forms(written: object, size: int) -> None:
    """Sizes take B/KiB/MiB/GiB units or a plain number of bytes, and print back the same."""
    cfg = _parse(_with({"upstream.max_head_size": written}))
    assert cfg.upstream.max_head_size == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("written", ["64KB", "1.5MiB", "-1", 0, "lots", True, 2.5])
def test_bad_sizes_name_the_field(written: object) -> None:
    """Decimal or fractional units, zero and non-numbers are refused, naming the field."""
    (line,) = _error_lines(_with({"upstream.max_head_size": written}))
    assert line.startswith(f"{SOURCE}: upstream.max_head_size: ")
    assert "64KiB" in line


def test_idle_pool_larger_than_connection_cap_is_an_error() -> None:
    """pool_size above max_connections could never be used: the error names pool_size."""
    (line,) = _error_lines(_with({"upstream.pool_size": 300, "upstream.max_connections": 10}))
    assert line.startswith(f"{SOURCE}: upstream.pool_size: 300 idle connections")


def test_status_both_pending_and_ending_is_an_error_only_when_written() -> None:
    """Naming a status in pending_status and end_status is an error; overlapping the default
    end_status is not (pending is checked first)."""
    (line,) = _error_lines(
        _with({"jobs.recording.pending_status": [202], "jobs.recording.end_status": [200, 202]})
    )
    assert line.startswith(f"{SOURCE}: jobs.recording.end_status: [202] also in pending_status")
    cfg = _parse(_with({"jobs.recording.pending_status": [202, 204]}))
    assert 204 in cfg.jobs["recording"].end_status


def test_defaults() -> None:
    """Omitted settings take the documented defaults."""
    cfg = parse_config(
        "upstream: {url: 'http://127.0.0.1:5000/'}\n"
        "jobs: {recording: {reprepare: {path: '/p/{id}'}}}\n"
        "routes: [{path: '/f/{id}', job: recording}]\n",
        env={},
    )
    upstream, state, admin, job = cfg.upstream, cfg.state, cfg.admin, cfg.jobs["recording"]
    assert (upstream.url, upstream.connect_timeout, upstream.read_timeout) == (
        "http://127.0.0.1:5000",
        3.0,
        60.0,
    )
    assert (upstream.pool_size, upstream.preserve_host, upstream.trusted_proxies) == (
        100,
        False,
        (),
    )
    assert (state.redis_url, state.key_prefix, state.on_error, state.timeout) == (
        None,
        "pollguard:",
        "pass",
        0.25,
    )
    assert (admin.prefix, admin.token) == ("/-/", None)
    assert (
        upstream.max_connections,
        upstream.pool_timeout,
        upstream.max_head_size,
        upstream.max_header_fields,
    ) == (256, 5.0, 65536, 200)
    server = cfg.server
    assert (server.host, server.port, server.workers, server.log_level) == (
        "127.0.0.1",
        8080,
        1,
        "info",
    )
    assert (server.access_log, server.tls.enabled) == (False, False)
    tls = upstream.tls
    assert (tls.ca_file, tls.verify, tls.cert_file, tls.key_file, tls.server_name) == (
        None,
        True,
        None,
        None,
        None,
    )
    assert (server.send_timeout, server.shutdown_timeout) == (60.0, 30.0)
    assert (server.max_head_size, server.max_header_fields) == (65536, 200)
    assert (state.breaker_cooldown, state.memory_max_records) == (2.0, 100_000)
    assert (upstream.read_ahead, state.remembered_records) == (65536, 10_000)
    assert job.end_status == frozenset({200, 203, 204, 206, 304})
    assert (job.mode, job.pending_status, job.stuck_after, job.max_reprepares) == (
        "enforce",
        frozenset({202}),
        300.0,
        3,
    )
    assert (
        job.reprepare_window,
        job.max_wait,
        job.retry_after,
        job.retry_after_max,
        job.retry_after_reprepared,
        job.key_pattern,
    ) == (600.0, 1200.0, 2.0, 30.0, 3.0, None)
    reprepare = job.reprepare
    assert (reprepare.method, reprepare.query, reprepare.headers) == ("POST", {}, {})
    assert (reprepare.forward_headers, reprepare.timeout) == (("authorization", "cookie"), 10.0)
    route = cfg.routes[0]
    assert (route.methods, route.key, route.param_names) == (
        frozenset({"GET", "HEAD"}),
        None,
        ("id",),
    )


def test_jobs_and_routes_default_to_empty() -> None:
    """A config with only an upstream has no jobs and no routes."""
    cfg = parse_config("upstream:\n  url: http://b\nstate:\n", env={})
    assert (dict(cfg.jobs), cfg.routes, cfg.state.on_error) == ({}, (), "pass")


def test_values_are_normalised() -> None:
    """Methods upper-cased, header names lower-cased, query values strings, networks widened."""
    cfg = _parse(
        _with(
            {
                "routes.0.methods": ["get", "Head"],
                "jobs.recording.reprepare.method": "post",
                "jobs.recording.reprepare.query": {"force": 1, "dry": False},
                "jobs.recording.reprepare.forward_headers": ["Authorization", "X-Tenant"],
                "jobs.recording.pending_status": [202, 204, 202],
                "jobs.recording.key_pattern": "^CA[0-9a-f]{32}$",
                "upstream.trusted_proxies": ["10.0.0.7/8", "::1"],
                "admin.token": "s3cret",
                "state.redis_url": "",
            }
        )
    )
    job = cfg.jobs["recording"]
    assert cfg.routes[0].methods == frozenset({"GET", "HEAD"})
    assert job.reprepare.method == "POST"
    assert job.reprepare.query == {"force": "1", "dry": "false"}
    assert job.reprepare.forward_headers == ("authorization", "x-tenant")
    assert job.pending_status == frozenset({202, 204})
    assert isinstance(job.key_pattern, re.Pattern) and job.key_pattern.match("CA" + "0" * 32)
    assert cfg.upstream.trusted_proxies == (ip_network("10.0.0.0/8"), ip_network("::1/128"))
    assert isinstance(cfg.admin.token, SecretStr)
    assert cfg.admin.token.get_secret_value() == "s3cret"
    assert cfg.state.redis_url is None


def test_models_are_frozen() -> None:
    """Loaded config cannot be mutated by the code that uses it."""
    cfg = _parse(_valid())
    with pytest.raises(ValidationError):
        cfg.upstream.url = "http://elsewhere"  # type: ignore[misc]


def test_route_param_names_in_order() -> None:
    """RouteConfig.param_names lists the path's {name}s in order."""
    route = RouteConfig(path="/a/{account}/b/{call_sid}", job="j")
    assert route.param_names == ("account", "call_sid")


WARNING_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("well tuned", {"jobs.recording.reprepare_window": "15m"}, []),
    (
        "max_wait not above stuck_after",
        {"jobs.recording.max_wait": "5m", "jobs.recording.reprepare_window": "15m"},
        [
            "jobs.recording: max_wait (5m) <= stuck_after (5m) — a pure wait cap that never "
            "re-prepares; raise max_wait above stuck_after if stuck jobs should be re-prepared"
        ],
    ),
    (
        "window shorter than the re-prepares need",
        {"jobs.recording.reprepare_window": "10m"},
        [
            "jobs.recording: reprepare_window (10m) < stuck_after x max_reprepares (15m) — the "
            "window rolls over before 3 re-prepares can accumulate, so job-stuck can never be "
            "answered; raise reprepare_window to at least 15m"
        ],
    ),
    (
        "unused job",
        {
            "jobs.recording.reprepare_window": "15m",
            "jobs.spare": {"reprepare": {"path": "/p"}, "reprepare_window": "1h"},
        },
        ["jobs.spare: no route uses this job — add a route with job: spare or remove it"],
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [pytest.param(changes, expected, id=name) for name, changes, expected in WARNING_CASES],
)
def test_config_warnings(changes: dict[str, Any], expected: list[str]) -> None:
    """Suspicious but legal job settings produce one explanatory warning each."""
    assert config_warnings(_parse(_with(changes))) == expected


def test_ca_file_with_verification_off_is_a_warning(pki: Pki) -> None:
    """upstream.tls.ca_file is legal but unused with verify: false; the warning says so."""
    changes = {
        "jobs.recording.reprepare_window": "15m",
        "upstream.url": "https://backend",
        "upstream.tls": {"ca_file": pki.ca_file, "verify": False},
    }
    assert config_warnings(_parse(_with(changes))) == [
        "upstream.tls: ca_file is unused while verify is false — remove ca_file, or set "
        "verify: true to check the upstream's certificate against it"
    ]


def test_render_masks_secrets() -> None:
    """render_config hides the admin token, Redis passwords and credential headers."""
    cfg = _parse(
        _with(
            {
                "admin.token": "tok-123",
                "state.redis_url": "rediss://pollguard:hunter2@cache:6380/1?password=hunter3",
                "jobs.recording.reprepare.headers": {
                    "Authorization": "Bearer abc",
                    "X-Tenant": "t1",
                },
            }
        )
    )
    text = render_config(cfg)
    for secret in ("tok-123", "hunter2", "hunter3", "Bearer abc"):
        assert secret not in text
    rendered = yaml.safe_load(text)
    assert rendered["admin"]["token"] == "***"
    assert rendered["state"]["redis_url"] == "rediss://pollguard:***@cache:6380/1?password=***"
    assert rendered["jobs"]["recording"]["reprepare"]["headers"] == {
        "Authorization": "***",
        "X-Tenant": "t1",
    }


def test_render_round_trips_and_prints_durations_with_units() -> None:
    """Rendered config uses unit durations and loads back to an equal Config."""
    cfg = load_config(SHIPPED_CONFIG, env={})
    text = render_config(cfg)
    rendered = yaml.safe_load(text)
    assert rendered["state"]["timeout"] == "250ms"
    assert rendered["jobs"]["recording"]["stuck_after"] == "5m"
    assert parse_config(text, env={}) == cfg


def test_shipped_config_loads() -> None:
    """The example config.yaml at the repository root loads with the documented values."""
    cfg = load_config(SHIPPED_CONFIG, env={})
    assert cfg.upstream.url == "http://127.0.0.1:5000"
    assert (cfg.state.redis_url, cfg.admin.token, cfg.admin.prefix) == (None, None, "/-/")
    assert [(r.path, r.methods, r.job, r.key) for r in cfg.routes] == [
        ("/api/recordings/file/{call_sid}", frozenset({"GET", "HEAD"}), "recording", "{call_sid}"),
        ("/api/recordings/{call_sid}/prepare", frozenset({"POST"}), "recording", "{call_sid}"),
    ]
    job = cfg.jobs["recording"]
    assert job.reprepare.path == "/api/recordings/{call_sid}/prepare"
    assert job.reprepare.query == {"force": "1"}
    assert job.key_pattern is not None and job.key_pattern.pattern == "^CA[0-9a-fA-F]{32}$"


def test_shipped_config_reads_its_environment() -> None:
    """The shipped config takes the upstream, Redis URL and admin token from the environment."""
    cfg = load_config(
        SHIPPED_CONFIG,
        env={
            "POLLGUARD_UPSTREAM": "https://legacy.internal/",
            "REDIS_URL": "redis://cache:6379/0",
            "POLLGUARD_ADMIN_TOKEN": "t0ken",
        },
    )
    assert cfg.upstream.url == "https://legacy.internal"
    assert cfg.state.redis_url == "redis://cache:6379/0"
    assert cfg.admin.token is not None and cfg.admin.token.get_secret_value() == "t0ken"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "upstream:\n  url: [http://b\n",
            "config.yaml: invalid YAML — line 3, column 1: while parsing a flow sequence, "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (
            "upstream:\n  url: http://a\n  url: http://b\n",
            "config.yaml: invalid YAML — line 3, column 3: duplicate key 'url' — remove one of them",
        ),
        (
            "- upstream\n",
            "config.yaml: the top level must be a mapping of sections (upstream, state, admin, "
            "jobs, routes), got list",
        ),
    ],
    ids=["syntax error", "duplicate key", "top level not a mapping"],
)
def test_unparseable_yaml_is_a_config_error(text: str, expected: str) -> None:
    """YAML syntax errors, duplicate keys and a non-mapping document raise ConfigError."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={}, source=SOURCE)
    assert str(caught.value) == expected


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    """load_config validates a file and names it in messages."""
    path = tmp_path / "pollguard.yaml"
    path.write_text("upstream:\n  url: http://backend:8000/\n", encoding="utf-8")
    assert load_config(path, env={}).upstream.url == "http://backend:8000"
    path.write_text("upstream:\n  url: gopher://backend\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: upstream\.url: unsupported"):
        load_config(str(path), env={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == (
        f"{missing}: file not found — pass the path of an existing config file (the repository "
        "ships an example config.yaml)"
    )


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A path that cannot be read as text (here a directory) raises ConfigError."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read the config"):
        load_config(tmp_path)


def test_job_name_with_colon_is_rejected() -> None:
    """Job names become part of Redis keys, so ':' (the job/key separator) is refused."""
    text = (
        "upstream:\n  url: http://127.0.0.1:5000\n"
        "jobs:\n  'a:b':\n    reprepare:\n      path: /prepare\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    assert "jobs.a:b" in str(caught.value)
    assert "invalid job name 'a:b'" in str(caught.value)


def test_websocket_defaults() -> None:
    """websocket: 16 MiB messages, 20 s pings with a 20 s timeout, no idle timeout, and the
    upstream's connect timeout for the handshake."""
    cfg = _parse(_valid())
    websocket = cfg.websocket
    assert (websocket.max_message_size, websocket.ping_interval, websocket.ping_timeout) == (
        16 * 1024 * 1024,
        20.0,
        20.0,
    )
    assert (websocket.idle_timeout, websocket.connect_timeout) == (None, None)
    assert websocket.connect_timeout_within(cfg.upstream) == 3.0
    assert websocket.upstream_deflate is True


def test_websocket_settings_and_null_disables() -> None:
    """Sizes and durations take units; null turns pings off; connect_timeout overrides the
    upstream's; the rendered config loads back equal."""
    cfg = _parse(
        _with(
            {
                "websocket.max_message_size": "1MiB",
                "websocket.ping_interval": None,
                "websocket.idle_timeout": "5m",
                "websocket.connect_timeout": "750ms",
                "websocket.upstream_deflate": False,
            }
        )
    )
    websocket = cfg.websocket
    assert (websocket.max_message_size, websocket.ping_interval) == (1024 * 1024, None)
    assert (websocket.idle_timeout, websocket.connect_timeout_within(cfg.upstream)) == (300.0, 0.75)
    rendered = yaml.safe_load(render_config(cfg))["websocket"]
    assert rendered == {
        "max_message_size": "1MiB",
        "ping_interval": None,
        "ping_timeout": "20s",
        "idle_timeout": "5m",
        "connect_timeout": "750ms",
        "upstream_deflate": False,
    }
    assert parse_config(render_config(cfg), env={}) == cfg


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"websocket.idle_timeout": 0},
            f"websocket.idle_timeout: duration must be greater than 0, got 0 — {DURATION_FIX}",
        ),
        ({"websocket.max_message_size": "lots"}, "websocket.max_message_size: invalid size"),
        ({"websocket.ping": "20s"}, "websocket.ping: unknown key"),
    ],
)
def test_invalid_websocket_settings_name_the_field(changes: dict[str, Any], expected: str) -> None:
    """A bad websocket: value is reported with its dotted path."""
    (line,) = _error_lines(_with(changes))
    assert line.startswith(f"{SOURCE}: {expected}")


@pytest.mark.parametrize(
    ("written", "seconds"),
    [(None, 120.0), ("30s", 30.0), ("1h", 3600.0), (0, 0.0), ("0", 0.0), ("0s", 0.0), ("0ms", 0.0)],
)
def test_terminal_cooldown_defaults_to_2m_and_takes_zero(written: object, seconds: float) -> None:
    """jobs.<name>.terminal_cooldown: 2m unless set; 0 (in any unit) switches it off; it
    reaches the guard's limits."""
    data = _valid() if written is None else _with({"jobs.recording.terminal_cooldown": written})
    cfg = _parse(data)
    assert cfg.jobs["recording"].terminal_cooldown == seconds
    jobs, _ = guard_rules(cfg)
    assert jobs["recording"].limits.terminal_cooldown == seconds


@pytest.mark.parametrize("written", ["-1s", -5, "soon", "inf"])
def test_terminal_cooldown_rejects_negative_and_garbage(written: object) -> None:
    (line,) = [
        line
        for line in _error_lines(_with({"jobs.recording.terminal_cooldown": written}))
        if "terminal_cooldown" in line
    ]
    assert line.startswith(f"{SOURCE}: jobs.recording.terminal_cooldown: ")
    if written in ("-1s", -5):
        assert "must be 0 or more" in line
