"""pollguard's configuration: frozen pydantic models, cross-field checks, loading and rendering.

Reading text, `${VAR}` interpolation, duration parsing and the translation of pydantic errors
into `source: dotted.path: problem — fix` lines live in proxy.config_loading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.config_loading import (
    FieldProblems,
    Path,
    Section,
    blank_to_none,
    dotted_path,
    format_duration,
    format_size,
    interpolate_env,
    load_yaml_mapping,
    mask_redis_url,
    parse_duration,
    parse_size,
    translate_validation_error,
)
from proxy.config_tls import ServerTLSConfig, UpstreamTLSConfig
from proxy.errors import ConfigError
from proxy.headers import NEVER_FORWARDED_ON_REPREPARE
from proxy.hints import (
    DEFAULT_QUEUED_AFTER,
    DEFAULT_RUNNING_AFTER,
    DEFAULT_RUNNING_WITHOUT_START,
    HintsConfig,
)
from proxy.policy import DEFAULT_TERMINAL_COOLDOWN_SECONDS, GuardLimits
from proxy.routes import DEFAULT_KEY_SEPARATOR, template_params

__all__ = [
    "AdminConfig",
    "Config",
    "JobConfig",
    "ProbeConfig",
    "ReprepareConfig",
    "RouteConfig",
    "ServerConfig",
    "ServerTLSConfig",
    "StateConfig",
    "SweepConfig",
    "UpstreamConfig",
    "UpstreamTLSConfig",
    "WebSocketConfig",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
]

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_POOL_SIZE = 100
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_POOL_TIMEOUT = 5.0
DEFAULT_MAX_HEAD_SIZE = 64 * 1024
DEFAULT_MAX_HEADER_FIELDS = 200
# Measured with 200 clients that never read a 50 MiB download: a 256 KiB read-ahead gave ~514 KiB
# of RSS per client, 64 KiB ~260 KiB (the rest is the connections' own state), at the same
# download speed.
DEFAULT_READ_AHEAD = 64 * 1024
MIN_READ_AHEAD = 4 * 1024
DEFAULT_REMEMBERED_RECORDS = 10_000
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_MAX_REQUEST_HEAD_SIZE = 64 * 1024
DEFAULT_MAX_REQUEST_HEADER_FIELDS = 200
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_WORKERS = 1
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
DEFAULT_LOG_LEVEL: LogLevel = "info"
DEFAULT_BREAKER_COOLDOWN = 2.0
DEFAULT_MEMORY_MAX_RECORDS = 100_000
DEFAULT_KEY_PREFIX = "pollguard:"
DEFAULT_STORE_TIMEOUT = 0.25
DEFAULT_ADMIN_PREFIX = "/-/"
# WebSocket pass-through. 16 MiB is uvicorn's and most browsers' working limit; 20 s pings keep
# idle connections alive through NAT and load balancers that drop silent flows after 30-60 s.
DEFAULT_WS_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_WS_PING_INTERVAL = 20.0
DEFAULT_WS_PING_TIMEOUT = 20.0
DEFAULT_PENDING_STATUS = frozenset({202})
# Only answers that mean "the result is there" end an episode by default: a 404/401/403 may be
# another tenant's answer about the same key, and must not switch the guard off for its owner.
DEFAULT_END_STATUS = frozenset({200, 203, 204, 206, 304})
DEFAULT_STUCK_AFTER = 300.0
DEFAULT_MAX_REPREPARES = 3
DEFAULT_REPREPARE_WINDOW = 600.0
DEFAULT_MAX_WAIT = 1200.0
DEFAULT_RETRY_AFTER = 2.0
DEFAULT_RETRY_AFTER_MAX = 30.0
DEFAULT_RETRY_AFTER_REPREPARED = 3.0
DEFAULT_TERMINAL_COOLDOWN = DEFAULT_TERMINAL_COOLDOWN_SECONDS  # declared once, by the policy
DEFAULT_REPREPARE_METHOD = "POST"
DEFAULT_FORWARD_HEADERS = ("authorization", "cookie")
DEFAULT_REPREPARE_TIMEOUT = 10.0
DEFAULT_ROUTE_METHODS = frozenset({"GET", "HEAD"})
# The sweeper (jobs.<name>.sweep, proxy.sweeper): a pass every 30s over keys unpolled for 1m.
DEFAULT_SWEEP_INTERVAL = 30.0
DEFAULT_SWEEP_IDLE_AFTER = 60.0
MIN_SWEEP_INTERVAL = 1.0  # each pass claims a lease and scans: not a busy loop
MAX_SWEEP_INTERVAL = 3600.0
MAX_SWEEP_IDLE_AFTER = 86400.0
UPSTREAM_SCHEMES = ("http", "https")
REDIS_SCHEMES = ("redis", "rediss", "unix")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: methods, header names


def _http_token(kind: str) -> AfterValidator:
    def check(value: str) -> str:
        if not _TOKEN_RE.match(value):
            raise ValueError(f"invalid {kind} {value!r} — use letters, digits or !#$%&'*+-.^_`|~")
        return value

    return AfterValidator(check)


def _to_network(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"invalid IP address or network {value!r} — use an address like 10.0.0.1 or a CIDR "
            "like 10.0.0.0/8"
        ) from None


def _compile_regex(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(
            f"invalid regular expression {value!r}: {exc} — fix the pattern (Python re syntax)"
        ) from None


def _stringify_values(value: object) -> object:
    if not isinstance(value, dict):
        return value
    return {key: _scalar_text(item) for key, item in value.items()}


def _scalar_text(item: object) -> object:
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item) if isinstance(item, int | float) else item


def _path_template(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"path {value!r} must start with '/' — e.g. /api/recordings/{{call_sid}}")
    template_params(value)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _size_or_zero(value: object) -> int:
    return 0 if value == 0 or value == "0" else parse_size(value)


ByteSizeOrZero = Annotated[int, BeforeValidator(_size_or_zero)]  # 0 switches something off
_ZERO_DURATION = re.compile(r"\s*0+(\.0*)?\s*(ms|s|m|h)?\s*")


def _duration_or_zero(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value):
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        message = str(exc).replace("must be greater than 0", "must be 0 or more")
        raise ValueError(message) from None


DurationOrZero = Annotated[float, BeforeValidator(_duration_or_zero)]  # 0 switches something off
HttpMethod = Annotated[str, AfterValidator(str.upper), _http_token("HTTP method")]
HeaderName = Annotated[str, AfterValidator(str.lower), _http_token("header name")]
TrustedProxy = Annotated[IPv4Network | IPv6Network, BeforeValidator(_to_network)]
StatusCode = Annotated[int, Field(ge=100, le=599)]
StringMap = Annotated[dict[str, str], BeforeValidator(_stringify_values)]
PathTemplate = Annotated[str, AfterValidator(_path_template)]


class UpstreamConfig(Section):
    url: str
    connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT
    read_timeout: Duration = DEFAULT_READ_TIMEOUT
    pool_size: int = Field(default=DEFAULT_POOL_SIZE, ge=1)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    pool_timeout: Duration = DEFAULT_POOL_TIMEOUT
    max_head_size: ByteSize = DEFAULT_MAX_HEAD_SIZE
    max_header_fields: int = Field(default=DEFAULT_MAX_HEADER_FIELDS, ge=1)
    read_ahead: Annotated[ByteSize, Field(ge=MIN_READ_AHEAD)] = DEFAULT_READ_AHEAD
    preserve_host: bool = False
    trusted_proxies: tuple[TrustedProxy, ...] = ()
    tls: UpstreamTLSConfig = Field(default_factory=UpstreamTLSConfig)

    @property
    def is_https(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "https"

    @model_validator(mode="after")
    def _cross_field_checks(self) -> UpstreamConfig:
        problems: list[tuple[Path, str]] = []
        if self.pool_size > self.max_connections:
            problems.append(
                (
                    ("pool_size",),
                    f"{self.pool_size} idle connections can't be kept when at most "
                    f"{self.max_connections} may be open (max_connections) — lower "
                    "pool_size or raise max_connections",
                )
            )
        if "tls" in self.model_fields_set and not self.is_https:
            # An error, not a warning: someone who set a CA or a client certificate believes
            # the traffic is protected, and over http:// it is not.
            problems.append(
                (
                    ("tls",),
                    f"set, but url {self.url!r} is not https:// — TLS settings apply to an "
                    "https:// upstream only; use an https:// URL or remove upstream.tls",
                )
            )
        if problems:
            raise FieldProblems(problems)
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        example = "e.g. http://127.0.0.1:5000"
        parts = urlsplit(url.strip())
        if parts.scheme not in UPSTREAM_SCHEMES:
            raise ValueError(f"unsupported URL {url!r} — use an http:// or https:// URL, {example}")
        if not parts.hostname:
            raise ValueError(f"no host in {url!r} — {example}")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r} has a query or fragment — remove everything after ? or #")
        try:
            parts.port  # noqa: B018 - property access validates the port
        except ValueError:
            raise ValueError(f"invalid port in {url!r} — {example}") from None
        return url.strip().rstrip("/")


class StateConfig(Section):
    redis_url: Annotated[str | None, BeforeValidator(blank_to_none)] = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    on_error: Literal["pass", "fail"] = "pass"
    timeout: Duration = DEFAULT_STORE_TIMEOUT
    breaker_cooldown: Duration = DEFAULT_BREAKER_COOLDOWN
    memory_max_records: int = Field(default=DEFAULT_MEMORY_MAX_RECORDS, ge=1)
    remembered_records: int = Field(default=DEFAULT_REMEMBERED_RECORDS, ge=1)

    # Topology (README "Scaling out"): one server, a Redis Cluster, or a Sentinel-managed master.
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_nodes: tuple[str, ...] | None = None  # cluster: startup nodes, host:port each
    sentinels: tuple[str, ...] | None = None  # sentinel: host:port each
    sentinel_service: Annotated[str | None, BeforeValidator(blank_to_none)] = None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"unsupported Redis URL {mask_redis_url(url)!r} — use redis://, rediss:// or "
                "unix://, e.g. redis://127.0.0.1:6379/0, or leave it empty for the in-memory store"
            )
        return url

    @field_validator("redis_nodes", "sentinels")
    @classmethod
    def _check_addresses(cls, addresses: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if addresses is None:
            return None
        if not addresses:
            raise ValueError("empty — list at least one host:port, e.g. 127.0.0.1:7000")
        for address in addresses:
            parse_host_port(address)
        return addresses

    @property
    def uses_redis(self) -> bool:
        """Whether job state lives in Redis (any mode) rather than in process memory."""
        return self.redis_url is not None or self.redis_mode != "standalone"

    @model_validator(mode="after")
    def _check_topology(self) -> StateConfig:
        problems: list[tuple[Path, str]] = []
        mode = self.redis_mode
        if mode == "cluster" and self.redis_url is None and self.redis_nodes is None:
            problems.append(
                (
                    ("redis_url",),
                    "redis_mode is cluster, but neither redis_url nor redis_nodes is set — set "
                    "redis_url to any cluster node, e.g. redis://127.0.0.1:7000, or list "
                    "redis_nodes",
                )
            )
        if mode == "cluster" and self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme == "unix" or parts.path.strip("/") not in ("", "0"):
                problems.append(
                    (
                        ("redis_url",),
                        f"{mask_redis_url(self.redis_url)!r} can't address a Redis Cluster — "
                        "use redis:// or rediss:// host:port with database 0",
                    )
                )
        if mode == "sentinel":
            if self.sentinels is None:
                problems.append(
                    (
                        ("sentinels",),
                        "redis_mode is sentinel, but no sentinels are listed — list them as "
                        'host:port, e.g. ["127.0.0.1:26379"]',
                    )
                )
            if self.sentinel_service is None:
                problems.append(
                    (
                        ("sentinel_service",),
                        "redis_mode is sentinel, but sentinel_service is not set — set the "
                        "master's name the sentinels monitor, e.g. mymaster",
                    )
                )
            if self.redis_url is not None and urlsplit(self.redis_url).scheme == "unix":
                problems.append(
                    (
                        ("redis_url",),
                        "a unix:// URL can't name a Sentinel-managed master — in sentinel mode "
                        "redis_url only carries credentials, database and rediss://",
                    )
                )
        if self.redis_nodes is not None and mode != "cluster":
            problems.append(
                (("redis_nodes",), f"set, but redis_mode is {mode} — it applies to cluster only")
            )
        if mode != "sentinel":
            for name in ("sentinels", "sentinel_service"):
                if getattr(self, name) is not None:
                    problems.append(
                        ((name,), f"set, but redis_mode is {mode} — it applies to sentinel only")
                    )
        if problems:
            raise FieldProblems(problems)
        return self


def parse_host_port(address: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` too) as (host, port); ValueError naming what is wrong."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {address!r} — use host:port, e.g. 127.0.0.1:26379")
    return host, int(port_text)


class ServerConfig(Section):
    """How `pollguard serve` listens; --host, --port, --workers and --log-level override."""

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    workers: int = Field(default=DEFAULT_WORKERS, ge=1)
    log_level: LogLevel = DEFAULT_LOG_LEVEL
    # Deprecated alias of logging.access (it was uvicorn's access line before 0.2.0).
    access_log: bool = False
    send_timeout: Duration = DEFAULT_SEND_TIMEOUT
    max_head_size: ByteSize = DEFAULT_MAX_REQUEST_HEAD_SIZE
    max_header_fields: int = Field(default=DEFAULT_MAX_REQUEST_HEADER_FIELDS, ge=1)
    shutdown_timeout: Duration = DEFAULT_SHUTDOWN_TIMEOUT
    tls: ServerTLSConfig = Field(default_factory=ServerTLSConfig)

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        if not host.strip() or any(char in host for char in "/ "):
            raise ValueError(
                f"invalid host {host!r} — an address to listen on, e.g. 127.0.0.1, 0.0.0.0 or ::"
            )
        return host.strip()


_ADMIN_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LEGACY_ADMIN_TOKEN_NAME = "admin"  # what admin.token is called among admin.tokens


class AdminConfig(Section):
    prefix: str = DEFAULT_ADMIN_PREFIX
    token: Annotated[SecretStr | None, BeforeValidator(blank_to_none)] = None
    # name → bearer token; a blank value (an unset ${VAR:-}) disables that token.
    tokens: Mapping[str, Annotated[SecretStr | None, BeforeValidator(blank_to_none)]] = Field(
        default_factory=dict
    )

    @field_validator("tokens")
    @classmethod
    def _check_token_names(
        cls, tokens: Mapping[str, SecretStr | None]
    ) -> Mapping[str, SecretStr | None]:
        for name in tokens:
            if not _ADMIN_TOKEN_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid token name {name!r} — use 1 to 64 letters, digits, '_', '-' or '.'"
                )
        return tokens

    @model_validator(mode="after")
    def _legacy_token_is_named_admin(self) -> AdminConfig:
        if self.token is not None and LEGACY_ADMIN_TOKEN_NAME in self.tokens:
            raise ValueError(
                "admin.token is the token named 'admin', and admin.tokens defines 'admin' too — "
                "move admin.token into admin.tokens"
            )
        return self

    def active_tokens(self) -> dict[str, str]:
        """Enabled tokens by name (admin.token as 'admin'); blank ones are left out."""
        active = {
            name: secret.get_secret_value()
            for name, secret in self.tokens.items()
            if secret is not None
        }
        if self.token is not None:
            active[LEGACY_ADMIN_TOKEN_NAME] = self.token.get_secret_value()
        return active

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        if prefix == "/" or not (prefix.startswith("/") and prefix.endswith("/")):
            raise ValueError(
                f"invalid prefix {prefix!r} — it must start and end with '/' and not be '/' "
                "alone, e.g. /-/"
            )
        return prefix


class WebSocketConfig(Section):
    """WebSocket pass-through; `null` disables a ping or idle timer. connect_timeout `null` means
    upstream.connect_timeout (see `connect_timeout_within`)."""

    max_message_size: Annotated[ByteSize, Field(ge=1)] = DEFAULT_WS_MAX_MESSAGE_SIZE
    ping_interval: Duration | None = DEFAULT_WS_PING_INTERVAL
    ping_timeout: Duration | None = DEFAULT_WS_PING_TIMEOUT
    idle_timeout: Duration | None = None
    connect_timeout: Duration | None = None
    upstream_deflate: bool = True

    def connect_timeout_within(self, upstream: UpstreamConfig) -> float:
        """The opening-handshake deadline: our own, else the upstream's connect timeout."""
        return upstream.connect_timeout if self.connect_timeout is None else self.connect_timeout


def _no_dot_segments(path: str) -> str:
    segments = path.split("?", 1)[0].split("/")
    if any(segment in (".", "..") for segment in segments):
        raise ValueError(
            f"path {path!r} has a '.' or '..' segment — URL libraries remove those, so the "
            "request would go elsewhere; write the path without them"
        )
    return path


def _forwardable(names: tuple[str, ...]) -> tuple[str, ...]:
    refused = [name for name in names if name.encode() in NEVER_FORWARDED_ON_REPREPARE]
    if refused:
        raise ValueError(
            f"{refused[0]!r} can't be forwarded — it frames or identifies the re-prepare request "
            "itself; remove it (forward e.g. authorization, cookie)"
        )
    return names


class ReprepareConfig(Section):
    method: HttpMethod = DEFAULT_REPREPARE_METHOD
    path: Annotated[PathTemplate, AfterValidator(_no_dot_segments)]
    query: StringMap = Field(default_factory=dict)
    headers: StringMap = Field(default_factory=dict)
    forward_headers: Annotated[tuple[HeaderName, ...], AfterValidator(_forwardable)] = (
        DEFAULT_FORWARD_HEADERS
    )
    timeout: Duration = DEFAULT_REPREPARE_TIMEOUT


MAX_MIN_POLL_INTERVAL = 600.0  # seconds: a pending answer reused for longer hides a ready job
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # field-value: no CTL but HTAB


def _sweep_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    for name, value in headers.items():
        if name.encode() in NEVER_FORWARDED_ON_REPREPARE:
            raise ValueError(
                f"{name!r} can't be set — it frames or identifies the re-prepare request itself; "
                "remove it (set e.g. authorization)"
            )
        if _HEADER_VALUE_BAD.search(value) or value != value.strip():
            raise ValueError(
                f"the value of {name!r} has a control character or surrounding whitespace — an "
                "HTTP field value is printable text; fix the value (or the variable it comes from)"
            )
    return headers


def _none_means_defaults(value: object) -> object:
    return {} if value is None else value


class SweepConfig(Section):
    """One replica at a time re-prepares this job's stuck keys nobody polls (proxy.sweeper)."""

    interval: Annotated[Duration, Field(ge=MIN_SWEEP_INTERVAL, le=MAX_SWEEP_INTERVAL)] = (
        DEFAULT_SWEEP_INTERVAL
    )
    idle_after: Annotated[Duration, Field(le=MAX_SWEEP_IDLE_AFTER)] = DEFAULT_SWEEP_IDLE_AFTER
    # The sweep's re-prepare has no client request to forward credentials from: these stand in.
    headers: Annotated[
        dict[HeaderName, str], BeforeValidator(_stringify_values), AfterValidator(_sweep_headers)
    ] = Field(default_factory=dict)


DEFAULT_PROBE_METHOD = "GET"
DEFAULT_PROBE_TIMEOUT = 2.0
DEFAULT_PROBE_MIN_INTERVAL = 10.0


class ProbeConfig(Section):
    """`jobs.<name>.probe`: a status request whose answer is read with the job's hints."""

    method: HttpMethod = DEFAULT_PROBE_METHOD
    path: Annotated[PathTemplate, AfterValidator(_no_dot_segments)]
    forward_headers: Annotated[tuple[HeaderName, ...], AfterValidator(_forwardable)] = (
        DEFAULT_FORWARD_HEADERS
    )
    timeout: Duration = DEFAULT_PROBE_TIMEOUT
    min_interval: Duration = DEFAULT_PROBE_MIN_INTERVAL  # per key, across replicas


class JobConfig(Section):
    mode: Literal["enforce", "shadow"] = "enforce"
    pending_status: frozenset[StatusCode] = Field(default=DEFAULT_PENDING_STATUS, min_length=1)
    end_status: frozenset[StatusCode] = DEFAULT_END_STATUS
    stuck_after: Duration = DEFAULT_STUCK_AFTER
    max_reprepares: int = Field(default=DEFAULT_MAX_REPREPARES, ge=0)
    reprepare_window: Duration = DEFAULT_REPREPARE_WINDOW
    max_wait: Duration = DEFAULT_MAX_WAIT
    retry_after: Duration = DEFAULT_RETRY_AFTER
    retry_after_max: Duration = DEFAULT_RETRY_AFTER_MAX
    retry_after_reprepared: Duration = DEFAULT_RETRY_AFTER_REPREPARED
    # After a terminal answer, polls get it again for this long; 0: the next starts afresh.
    terminal_cooldown: DurationOrZero = DEFAULT_TERMINAL_COOLDOWN
    key_pattern: Annotated[re.Pattern[str] | None, BeforeValidator(_compile_regex)] = None
    # Identical polls in flight on one replica share one upstream request (the herd shield).
    coalesce: bool = True
    # A pending answer is reused for this long across replicas (the cross-replica shield,
    # proxy.shield); 0: off. Bounded: clients of the key see an answer at most this old.
    min_poll_interval: DurationOrZero = Field(default=0.0, le=MAX_MIN_POLL_INTERVAL)
    reprepare: ReprepareConfig
    # Off when absent; `sweep:` alone (YAML null), like any section, means the defaults.
    sweep: Annotated[SweepConfig | None, BeforeValidator(_none_means_defaults)] = None
    # The backend's own clocks (proxy.hints, proxy.probe); default: no hints.
    hints: HintsConfig = Field(default_factory=HintsConfig)
    queued_after: Duration = DEFAULT_QUEUED_AFTER
    running_after: Duration = DEFAULT_RUNNING_AFTER
    running_without_start: Literal["stuck", "wait"] = DEFAULT_RUNNING_WITHOUT_START
    probe: ProbeConfig | None = None

    @model_validator(mode="after")
    def _retry_after_within_max(self) -> JobConfig:
        problems: list[tuple[Path, str]] = []
        if self.probe is not None and not self.hints.enabled:
            problems.append(
                (
                    ("probe",),
                    "set, but hints has no status source — the probe's answer is read with "
                    "the job's hints; add hints.status, e.g. {json: /status}",
                )
            )
        # A pending status is checked first; overlapping the *default* end_status is fine
        # (pending_status: [202, 204] means 204 is pending), naming it in both lists is not.
        both = sorted(self.pending_status & self.end_status)
        if both and "end_status" in self.model_fields_set:
            problems.append(
                (
                    ("end_status",),
                    f"{both} also in pending_status — a status is either pending or ends the "
                    "episode; remove it from one list",
                )
            )
        for name in ("retry_after", "retry_after_reprepared"):
            seconds: float = getattr(self, name)
            if seconds > self.retry_after_max:
                problems.append(
                    (
                        (name,),
                        f"{format_duration(seconds)} is greater than retry_after_max "
                        f"({format_duration(self.retry_after_max)}) — lower {name} or "
                        "raise retry_after_max",
                    )
                )
        if self.sweep is not None and self.sweep.idle_after <= self.retry_after_max:
            problems.append(
                (
                    ("sweep", "idle_after"),
                    f"{format_duration(self.sweep.idle_after)} is not longer than "
                    f"retry_after_max ({format_duration(self.retry_after_max)}) — a client "
                    "waiting the Retry-After it was given would look idle; raise idle_after",
                )
            )
        if problems:
            raise FieldProblems(problems)
        return self


def job_limits(job: JobConfig) -> GuardLimits:
    """The policy's limits for `job`: the one place config becomes GuardLimits. The demo
    declares its limits as GuardLimits and writes its config from them; a test reads them back
    through here."""
    return GuardLimits(
        stuck_after=job.stuck_after,
        max_reprepares=job.max_reprepares,
        reprepare_window=job.reprepare_window,
        max_wait=job.max_wait,
        retry_after=job.retry_after,
        retry_after_max=job.retry_after_max,
        retry_after_reprepared=job.retry_after_reprepared,
        reprepare_timeout=job.reprepare.timeout,
        terminal_cooldown=job.terminal_cooldown,
        queued_after=job.queued_after,
        running_after=job.running_after,
    )


class RouteConfig(Section):
    path: PathTemplate
    methods: frozenset[HttpMethod] = Field(default=DEFAULT_ROUTE_METHODS, min_length=1)
    job: str
    key: str | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        """The `{name}` parameters of `path`, in order."""
        return template_params(self.path)

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str | None) -> str | None:
        if key is not None:
            template_params(key)
        return key

    @model_validator(mode="after")
    def _key_uses_path_params(self) -> RouteConfig:
        if self.key is not None:
            unknown = [name for name in template_params(self.key) if name not in self.param_names]
            if unknown:
                raise FieldProblems([(("key",), _not_a_param(unknown[0], self))])
        return self


def _not_a_param(name: str, route: RouteConfig) -> str:
    known = ", ".join(f"{{{param}}}" for param in route.param_names) or "none"
    return (
        f"{{{name}}} is not a path parameter of route {route.path!r} — use one of its "
        f"parameters ({known}) or add {{{name}}} to the route path"
    )


DEFAULT_ACCESS_BUFFER = 64 * 1024
MAX_ACCESS_BUFFER = 16 * 1024 * 1024


class LoggingConfig(Section):
    """How log lines look (proxy.logformat); the level is server.log_level."""

    format: Literal["text", "json"] = "text"
    # One line per request on stdout (proxy.request_log), whatever server.log_level says.
    access: bool = False
    # Access lines are written when this much is pending, or after a second (0: each at once).
    access_buffer: ByteSizeOrZero = Field(default=DEFAULT_ACCESS_BUFFER, le=MAX_ACCESS_BUFFER)


class MetricsConfig(Section):
    """What /-/metrics counts beyond the guard's decisions and the edges' failures."""

    # pollguard_requests_total and the request/upstream latency histograms: a few hundred
    # nanoseconds per request (docs/benchmarks.md).
    requests: bool = True


class Config(Section):
    upstream: UpstreamConfig
    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    websocket: WebSocketConfig = Field(default_factory=WebSocketConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    jobs: Mapping[str, JobConfig] = Field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()

    @property
    def access_log(self) -> bool:
        """Whether each request gets an access line: logging.access, or its old name."""
        return self.logging.access or self.server.access_log

    @model_validator(mode="before")
    @classmethod
    def _null_sections_are_omitted(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @model_validator(mode="after")
    def _routes_match_jobs(self) -> Config:
        problems: list[tuple[Path, str]] = []
        defined = ", ".join(self.jobs) or "none"
        for name in self.jobs:
            # Job names become part of Redis keys ("prefix{job:key}"): a ":" could make two
            # (job, key) pairs share one record.
            if not _JOB_NAME.fullmatch(name):
                problems.append(
                    (
                        ("jobs", name),
                        f"invalid job name {name!r} — use letters, digits, '_', '-' or '.'",
                    )
                )
        for index, route in enumerate(self.routes):
            job = self.jobs.get(route.job)
            if job is None:
                problems.append(
                    (
                        ("routes", index, "job"),
                        f"unknown job {route.job!r} — define it under "
                        f"jobs or use a defined job ({defined})",
                    )
                )
                continue
            needed = template_params(job.reprepare.path)
            if job.sweep is not None:
                # The sweeper has only a stored key: each route's key must give every
                # parameter of the re-prepare path (proxy.keyparams inverts it).
                key = route.key
                if key is None:
                    key = DEFAULT_KEY_SEPARATOR.join(f"{{{name}}}" for name in route.param_names)
                lacking = [name for name in needed if name not in template_params(key)]
                if lacking:
                    problems.append(
                        (
                            ("jobs", route.job, "sweep"),
                            f"routes[{index}] key {key!r} lacks {lacking}, which "
                            f"reprepare.path needs — the sweeper has only the key; add "
                            f"{{{lacking[0]}}} to routes[{index}].key or remove sweep",
                        )
                    )
            templates = {"reprepare": job.reprepare.path}
            if job.probe is not None:
                templates["probe"] = job.probe.path
            for section, template in templates.items():
                for name in template_params(template):
                    if name not in route.param_names:
                        problems.append(
                            (
                                ("jobs", route.job, section, "path"),
                                f"{_not_a_param(name, route)} (routes[{index}] uses job "
                                f"{route.job})",
                            )
                        )
        if problems:
            raise FieldProblems(problems)
        return self


_MISSING_HINTS: dict[tuple[type[BaseModel], str], str] = {
    (Config, "upstream"): "add an upstream section with the legacy backend's base URL, e.g. "
    "url: http://127.0.0.1:5000",
    (UpstreamConfig, "url"): "set the legacy backend's base URL, e.g. http://127.0.0.1:5000",
    (JobConfig, "reprepare"): "add a reprepare section whose path forces the job to be prepared "
    "again, e.g. path: /api/recordings/{call_sid}/prepare",
    (ReprepareConfig, "path"): "set the backend path that forces the job to be prepared again, "
    "e.g. /api/recordings/{call_sid}/prepare",
    (ProbeConfig, "path"): "set the backend path that answers the job's status, e.g. "
    "/api/recordings/{call_sid}/status",
    (RouteConfig, "path"): "set the request path this route matches, e.g. "
    "/api/recordings/file/{call_sid}",
    (RouteConfig, "job"): "name the job (a key under jobs) that tracks this route",
}


def parse_config(
    text: str, env: Mapping[str, str] | None = None, source: str = "<string>"
) -> Config:
    """Validate config YAML text; every problem is reported, one `source: path: ...` per line."""
    data = load_yaml_mapping(text, source)
    problems: list[tuple[Path, str]] = []
    data = interpolate_env(data, os.environ if env is None else env, problems)
    if problems:
        lines = [f"{source}: {dotted_path(loc)}: {message}" for loc, message in problems]
        raise ConfigError("\n".join(lines))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise translate_validation_error(exc, Config, source, _MISSING_HINTS) from None


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; any problem, including I/O, raises ConfigError."""
    source = os.fspath(path)
    try:
        text = FilePath(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: file not found — pass the path of an existing config file "
            "(the repository ships an example config.yaml)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file — {exc}") from None
    return parse_config(text, env, source)
