"""What `check-config` and `serve` say about a valid config: warnings, the worker check, and
the effective config rendered as YAML with secrets masked."""

from __future__ import annotations

from typing import Any

import yaml

from proxy.config import Config, JobConfig
from proxy.config_loading import MASK, format_duration, format_size, mask_redis_url
from proxy.errors import ConfigError


def config_warnings(cfg: Config) -> list[str]:
    """Legal but probably unintended settings, one human sentence each."""
    warnings: list[str] = []
    used_jobs = {route.job for route in cfg.routes}
    if cfg.upstream.tls.ca_file is not None and not cfg.upstream.tls.verify:
        warnings.append(
            "upstream.tls: ca_file is unused while verify is false — remove ca_file, or set "
            "verify: true to check the upstream's certificate against it"
        )
    if cfg.server.access_log:
        warnings.append(
            "server.access_log is deprecated — it now turns on pollguard's own access line; "
            "write logging.access: true instead"
        )
    for name, job in cfg.jobs.items():
        stuck, window = format_duration(job.stuck_after), format_duration(job.reprepare_window)
        if job.max_wait <= job.stuck_after:
            warnings.append(
                f"jobs.{name}: max_wait ({format_duration(job.max_wait)}) <= stuck_after "
                f"({stuck}) — a pure wait cap that never re-prepares; raise max_wait above "
                "stuck_after if stuck jobs should be re-prepared"
            )
        needed = job.stuck_after * job.max_reprepares
        if job.reprepare_window < needed:
            warnings.append(
                f"jobs.{name}: reprepare_window ({window}) < stuck_after x max_reprepares "
                f"({format_duration(needed)}) — the window rolls over before {job.max_reprepares} "
                "re-prepares can accumulate, so job-stuck can never be answered; raise "
                f"reprepare_window to at least {format_duration(needed)}"
            )
        if name not in used_jobs:
            warnings.append(
                f"jobs.{name}: no route uses this job — add a route with job: {name} or remove it"
            )
    return warnings


def check_workers(cfg: Config, workers: int) -> None:
    """Several worker processes need a shared store; memory state would silently split."""
    if workers > 1 and not cfg.state.uses_redis:
        raise ConfigError(
            f"state.redis_url: not set, but {workers} workers were requested — job state would "
            f"split between the {workers} processes (each keeps its own in-memory store); set "
            "state.redis_url, e.g. redis://127.0.0.1:6379/0, or run 1 worker"
        )


def render_config(cfg: Config) -> str:
    """The effective config as YAML that loads back to the same values; secrets masked."""
    upstream, server, state, admin = cfg.upstream, cfg.server, cfg.state, cfg.admin
    websocket = cfg.websocket
    plain: dict[str, Any] = {
        "upstream": {
            "url": upstream.url,
            "connect_timeout": format_duration(upstream.connect_timeout),
            "read_timeout": format_duration(upstream.read_timeout),
            "pool_size": upstream.pool_size,
            "max_connections": upstream.max_connections,
            "pool_timeout": format_duration(upstream.pool_timeout),
            "max_head_size": format_size(upstream.max_head_size),
            "max_header_fields": upstream.max_header_fields,
            "read_ahead": format_size(upstream.read_ahead),
            "preserve_host": upstream.preserve_host,
            "trusted_proxies": [str(network) for network in upstream.trusted_proxies],
            # Only under an https:// URL: anywhere else a tls section is an error.
            **({"tls": upstream.tls.model_dump()} if upstream.is_https else {}),
        },
        "server": {
            "host": server.host,
            "port": server.port,
            "workers": server.workers,
            "log_level": server.log_level,
            "access_log": server.access_log,
            "send_timeout": format_duration(server.send_timeout),
            "max_head_size": format_size(server.max_head_size),
            "max_header_fields": server.max_header_fields,
            "shutdown_timeout": format_duration(server.shutdown_timeout),
            "tls": server.tls.model_dump(),
        },
        "state": {
            "redis_mode": state.redis_mode,
            "redis_url": None if state.redis_url is None else mask_redis_url(state.redis_url),
            **({"redis_nodes": list(state.redis_nodes)} if state.redis_nodes is not None else {}),
            **({"sentinels": list(state.sentinels)} if state.sentinels is not None else {}),
            **(
                {"sentinel_service": state.sentinel_service}
                if state.sentinel_service is not None
                else {}
            ),
            "key_prefix": state.key_prefix,
            "on_error": state.on_error,
            "timeout": format_duration(state.timeout),
            "breaker_cooldown": format_duration(state.breaker_cooldown),
            "memory_max_records": state.memory_max_records,
            "remembered_records": state.remembered_records,
        },
        "admin": {
            "prefix": admin.prefix,
            "token": None if admin.token is None else MASK,
            "tokens": {
                name: None if secret is None else MASK for name, secret in admin.tokens.items()
            },
        },
        "websocket": {
            "max_message_size": format_size(websocket.max_message_size),
            "ping_interval": _optional_duration(websocket.ping_interval),
            "ping_timeout": _optional_duration(websocket.ping_timeout),
            "idle_timeout": _optional_duration(websocket.idle_timeout),
            # null: upstream.connect_timeout (kept null so the rendered file follows it).
            "connect_timeout": _optional_duration(websocket.connect_timeout),
            "upstream_deflate": websocket.upstream_deflate,
        },
        "logging": {
            "format": cfg.logging.format,
            "access": cfg.logging.access,
            "access_buffer": format_size(cfg.logging.access_buffer),
        },
        "metrics": {"requests": cfg.metrics.requests},
        "jobs": {name: _plain_job(job) for name, job in cfg.jobs.items()},
        "routes": [
            {"path": r.path, "methods": sorted(r.methods), "job": r.job, "key": r.key}
            for r in cfg.routes
        ],
    }
    return yaml.safe_dump(_escape_env_refs(plain), sort_keys=False, allow_unicode=True)


def _optional_duration(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


def _plain_job(job: JobConfig) -> dict[str, Any]:
    reprepare = job.reprepare
    return {
        "mode": job.mode,
        "pending_status": sorted(job.pending_status),
        "end_status": sorted(job.end_status),
        "stuck_after": format_duration(job.stuck_after),
        "max_reprepares": job.max_reprepares,
        "reprepare_window": format_duration(job.reprepare_window),
        "max_wait": format_duration(job.max_wait),
        "retry_after": format_duration(job.retry_after),
        "retry_after_max": format_duration(job.retry_after_max),
        "retry_after_reprepared": format_duration(job.retry_after_reprepared),
        "terminal_cooldown": (
            format_duration(job.terminal_cooldown) if job.terminal_cooldown else "0s"
        ),
        "key_pattern": None if job.key_pattern is None else job.key_pattern.pattern,
        "coalesce": job.coalesce,
        "min_poll_interval": (
            format_duration(job.min_poll_interval) if job.min_poll_interval else "0s"
        ),
        "reprepare": {
            "method": reprepare.method,
            "path": reprepare.path,
            "query": dict(reprepare.query),
            "headers": {name: _mask_if_secret(name, v) for name, v in reprepare.headers.items()},
            "forward_headers": list(reprepare.forward_headers),
            "timeout": format_duration(reprepare.timeout),
        },
        **({} if job.sweep is None else {"sweep": _plain_sweep(job)}),
        **({} if not job.hints.enabled else _plain_clocks(job)),
    }


def _plain_clocks(job: JobConfig) -> dict[str, Any]:
    """The backend's clocks (proxy.hints) and the probe, for a job with hints."""
    hints = job.hints.model_dump(by_alias=True, exclude_none=True)
    hints["queued_values"] = list(job.hints.queued_values)
    hints["running_values"] = list(job.hints.running_values)
    hints["max_skew"] = format_duration(job.hints.max_skew)
    plain: dict[str, Any] = {
        "hints": hints,
        "queued_after": format_duration(job.queued_after),
        "running_after": format_duration(job.running_after),
        "running_without_start": job.running_without_start,
    }
    if job.probe is not None:
        probe = job.probe
        plain["probe"] = {
            "method": probe.method,
            "path": probe.path,
            "forward_headers": list(probe.forward_headers),
            "timeout": format_duration(probe.timeout),
            "min_interval": format_duration(probe.min_interval),
        }
    return plain


def _plain_sweep(job: JobConfig) -> dict[str, Any]:
    assert job.sweep is not None
    return {
        "interval": format_duration(job.sweep.interval),
        "idle_after": format_duration(job.sweep.idle_after),
        "headers": {name: _mask_if_secret(name, v) for name, v in job.sweep.headers.items()},
    }


def _mask_if_secret(header: str, value: str) -> str:
    # Static credentials for the re-prepare call are as secret as the admin token.
    return MASK if header.lower() in ("authorization", "cookie", "proxy-authorization") else value


def _escape_env_refs(data: Any) -> Any:
    # Rendered text is loadable config, so a literal `${` must not be read back as a reference.
    if isinstance(data, dict):
        return {key: _escape_env_refs(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_escape_env_refs(item) for item in data]
    return data.replace("${", "$${") if isinstance(data, str) else data
