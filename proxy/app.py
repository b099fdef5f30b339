"""The ASGI application: wiring of config → upstream, store, guard, admin; lifespan in one place."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import time
from typing import TYPE_CHECKING

from proxy.admin import create_admin_app
from proxy.admin_wiring import MEMORY_SCAN_STEP, REDIS_SCAN_STEP, admin_api
from proxy.config import Config, JobConfig, StateConfig, job_limits, load_config
from proxy.errors import ConfigError
from proxy.fdlimit import raise_open_files_limit
from proxy.forward import Forwarder, Message, Receive, Scope, Send
from proxy.guard import GuardedJob, JobGuard
from proxy.headers import new_request_id
from proxy.hints import clock_rules
from proxy.logformat import lean_log_records
from proxy.logtext import log_safe
from proxy.metrics_export import SharedMetrics, share_from_environment
from proxy.probe import Prober, ProbeRequest, ProbeThrottle
from proxy.problems import Problem
from proxy.reload import Reloader, under_serve
from proxy.reprepare import Repreparer, ReprepareRequest
from proxy.request_log import ADMIN, NO_RESPONSE, RequestLog
from proxy.routes import RouteSpec, RouteTable
from proxy.server_http import configure as configure_server_protocol
from proxy.stores import JobStore, create_store
from proxy.sweeper import Sweeper, sweep_settings
from proxy.tls import client_context
from proxy.upstream import Upstream, UpstreamSettings
from proxy.websocket import WebSocketProxy, WebSocketSettings

if TYPE_CHECKING:
    from proxy.stores.redis_topology import RedisTopology

logger = logging.getLogger("pollguard")

CONFIG_ENV = "POLLGUARD_CONFIG"


def redis_topology(state: StateConfig) -> RedisTopology | None:
    """The cluster or Sentinel topology of state; None for one server (or memory)."""
    if state.redis_mode == "standalone":
        return None
    from proxy.stores.redis_topology import RedisTopology

    return RedisTopology(
        mode=state.redis_mode,
        url=state.redis_url,
        nodes=state.redis_nodes or (),
        sentinels=state.sentinels or (),
        service=state.sentinel_service,
    )


def guarded_job(name: str, job: JobConfig) -> GuardedJob:
    return GuardedJob(
        name=name,
        shadow=job.mode == "shadow",
        pending_status=frozenset(job.pending_status),
        end_status=frozenset(job.end_status),
        key_pattern=job.key_pattern,
        limits=job_limits(job),
        reprepare=ReprepareRequest(
            method=job.reprepare.method,
            path=job.reprepare.path,
            query=dict(job.reprepare.query),
            headers=dict(job.reprepare.headers),
            forward_headers=tuple(job.reprepare.forward_headers),
            timeout=job.reprepare.timeout,
        ),
        coalesce=job.coalesce,
        min_poll_interval=job.min_poll_interval,
        hints=job.hints if job.hints.enabled else None,
        clock_rules=clock_rules(
            job.hints,
            queued_after=job.queued_after,
            running_after=job.running_after,
            running_without_start=job.running_without_start,
        )
        if job.hints.enabled
        else None,
        probe=ProbeRequest.from_config(job.probe) if job.probe is not None else None,
    )


def guard_rules(config: Config) -> tuple[dict[str, GuardedJob], RouteTable]:
    """The guard's jobs and route table from `config` (at startup, and at each reload)."""
    jobs = {name: guarded_job(name, job) for name, job in config.jobs.items()}
    routes = RouteTable(
        [
            RouteSpec(path=r.path, methods=frozenset(r.methods), job=r.job, key=r.key)
            for r in config.routes
        ]
    )
    return jobs, routes


def upstream_tls_context(config: Config) -> ssl.SSLContext | None:
    """The one client TLS context for an https:// upstream (forwarding, re-prepare, WebSocket);
    None for http://."""
    if not config.upstream.is_https:
        return None
    tls = config.upstream.tls
    return client_context(
        ca_file=tls.ca_file, verify=tls.verify, cert_file=tls.cert_file, key_file=tls.key_file
    )


class PollguardApp:
    """Dispatches admin paths to the admin app, WebSockets to their proxy, and everything else
    to the forwarder."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        # Without the file it came from (an embedded app), the config cannot be reloaded.
        self.reloader = Reloader(config_path, self) if config_path is not None else None
        self._prefix = config.admin.prefix
        self.upstream = Upstream(
            UpstreamSettings(
                url=config.upstream.url,
                connect_timeout=config.upstream.connect_timeout,
                read_timeout=config.upstream.read_timeout,
                pool_size=config.upstream.pool_size,
                max_connections=config.upstream.max_connections,
                pool_timeout=config.upstream.pool_timeout,
                max_head_size=config.upstream.max_head_size,
                max_header_fields=config.upstream.max_header_fields,
                read_ahead=config.upstream.read_ahead,
                ssl_context=upstream_tls_context(config),
                server_hostname=config.upstream.tls.server_name,
            )
        )
        self.store: JobStore | None = None
        self.shared_metrics: SharedMetrics | None = None
        self.guard: JobGuard | None = None
        self.sweeper: Sweeper | None = None
        self.repreparer: Repreparer | None = None
        self.prober: Prober | None = None
        request_log = RequestLog(
            metrics=config.metrics.requests,
            access=config.access_log,
            structured=config.logging.format == "json",
            batched=config.logging.access_buffer > 0,
        )
        if config.access_log:
            lean_log_records()
        self.request_log = request_log if request_log.enabled else None
        self.forwarder = Forwarder(
            self.upstream,
            None,
            trusted_proxies=config.upstream.trusted_proxies,
            preserve_host=config.upstream.preserve_host,
            send_timeout=config.server.send_timeout,
            request_log=request_log,
        )
        self.admin = create_admin_app(self._prefix, self.upstream, None)
        websocket = config.websocket
        self.websockets = WebSocketProxy(
            self.upstream,
            WebSocketSettings(
                max_message_size=websocket.max_message_size,
                ping_interval=websocket.ping_interval,
                ping_timeout=websocket.ping_timeout,
                idle_timeout=websocket.idle_timeout,
                connect_timeout=websocket.connect_timeout_within(config.upstream),
                send_timeout=config.server.send_timeout,
                upstream_deflate=websocket.upstream_deflate,
                trusted_proxies=config.upstream.trusted_proxies,
                preserve_host=config.upstream.preserve_host,
            ),
            self._prefix,
            request_log,
        )

    async def startup(self) -> None:
        config = self.config
        raise_open_files_limit()
        self.shared_metrics = share_from_environment()
        if self.shared_metrics is not None:
            self.shared_metrics.start()
        await self.upstream.start()
        if config.upstream.is_https and not config.upstream.tls.verify:
            logger.warning(
                "upstream.tls.verify is false: the certificate of %s is not checked, so anyone "
                "on the path can pose as the upstream; set verify: true (with ca_file for a "
                "private CA) outside of a test setup",
                config.upstream.url,
            )
        if config.routes:
            self.store = create_store(
                config.state.redis_url,
                config.state.key_prefix,
                config.state.timeout,
                breaker_cooldown=config.state.breaker_cooldown,
                memory_max_records=config.state.memory_max_records,
                topology=redis_topology(config.state),
            )
            self.repreparer = Repreparer(
                config.upstream.url,
                connect_timeout=config.upstream.connect_timeout,
                ssl_context=self.upstream.ssl_context,
                server_hostname=self.upstream.server_hostname,
            )
            # The status probe's client, as the re-prepare's (same upstream, same TLS).
            self.prober = Prober(
                config.upstream.url,
                ProbeThrottle(self.store),
                connect_timeout=config.upstream.connect_timeout,
                ssl_context=self.upstream.ssl_context,
                server_hostname=self.upstream.server_hostname,
            )
            jobs, routes = guard_rules(config)
            self.guard = JobGuard(
                jobs,
                routes,
                self.store,
                self.repreparer,
                fail_closed=config.state.on_error == "fail",
                # Only worth it in front of a shared store: the memory store is already local.
                remembered_records=config.state.remembered_records
                if config.state.uses_redis
                else 0,
                prober=self.prober,
            )
            self.forwarder.guard = self.guard
            # Jobs with `sweep` are swept periodically; with none, no task runs. Their settings
            # are read from the running config at each pass, so a reload applies to them.
            self.sweeper = Sweeper(
                self.guard,
                lambda: sweep_settings(self.config.jobs),
                scan_step=REDIS_SCAN_STEP if config.state.uses_redis else MEMORY_SCAN_STEP,
            )
            self.sweeper.reconfigured()
        redis_store = self.store if config.state.uses_redis else None
        token = config.admin.token.get_secret_value() if config.admin.token else None
        self.admin = create_admin_app(
            self._prefix,
            self.upstream,
            redis_store,
            token,
            store_required=config.state.on_error == "fail",
            reload=self.reloader.reload_all if self.reloader is not None else None,
            **admin_api(config, self.guard),
        )
        if self.reloader is not None and under_serve():
            self.reloader.install_signal_handler()
        logger.info(
            "pollguard forwarding to %s; %d guarded route(s); state in %s",
            config.upstream.url,
            len(config.routes),
            f"redis ({config.state.redis_mode})" if config.state.uses_redis else "memory",
        )

    @property
    def guarded(self) -> bool:
        return self.guard is not None

    def reconfigure(self, config: Config) -> None:
        """Run `config` from now on; only its jobs and routes take effect (proxy.reload)."""
        if self.guard is not None:
            self.guard.reconfigure(*guard_rules(config))
        self.config = config
        if self.sweeper is not None:
            self.sweeper.reconfigured()  # a job that started or stopped sweeping

    async def shutdown(self) -> None:
        if self.reloader is not None:
            await self.reloader.close()
        # Under pollguard serve every WebSocket is closed by now (proxy.server_ws, at SIGTERM);
        # under another server, this closes the rest with 1001.
        await self.websockets.close_all(self.config.server.shutdown_timeout)
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.guard is not None:
            # Episodes that just ended are forgotten in the background: let those writes land
            # (each is bounded by state.timeout) before the store closes.
            await self.guard.settled()
        await self.upstream.close()
        if self.repreparer is not None:
            await self.repreparer.close()
        if self.prober is not None:
            await self.prober.close()
        if self.store is not None:
            await self.store.close()
        if self.shared_metrics is not None:
            self.shared_metrics.close()
        if self.request_log is not None:
            self.request_log.flush()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"].startswith(self._prefix):
                if self.request_log is None:
                    await self.admin(scope, receive, send)
                else:
                    await self._logged_admin(scope, receive, send, self.request_log)
                return
            try:
                await self.forwarder(scope, receive, send)
            except Exception:
                logger.exception(
                    "unexpected error while proxying %s %s",
                    log_safe(scope["method"]),
                    log_safe(scope["path"]),
                )
                await _internal_error(send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            try:
                await self.websockets(scope, receive, send)
            except Exception:
                logger.exception(
                    "unexpected error while proxying WebSocket %s", log_safe(scope["path"])
                )

    async def _logged_admin(
        self, scope: Scope, receive: Receive, send: Send, request_log: RequestLog
    ) -> None:
        """The admin app, with its answer's status and size noted for the request log."""
        started = time.perf_counter()
        status, sent = NO_RESPONSE, 0

        async def noting(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.admin(scope, receive, noting)
        finally:
            request_log.other(ADMIN, scope, status, time.perf_counter() - started, sent)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _internal_error(send: Send) -> None:
    """A problem+json 500 for a bug of ours, when the response has not started yet."""
    problem = Problem(500, "internal-error", "pollguard failed to handle this request; see its log")
    request_id = new_request_id()
    body = problem.body(request_id.decode())
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": problem.headers(body, request_id),
            }
        )
        await send({"type": "http.response.body", "body": body})
    except RuntimeError:
        pass  # the response had already started: the server closes the connection


def create_app(config: Config | None = None) -> PollguardApp:
    """ASGI factory: `uvicorn --factory proxy.app:create_app` with POLLGUARD_CONFIG set."""
    path = None
    if config is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"{CONFIG_ENV} is not set — point it at a pollguard config.yaml")
        config = load_config(path)
        if under_serve():
            # SIGHUP reloads once the app has started (its handler is the event loop's);
            # until then, one must not end the process (SIGHUP's default).
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The server protocol of this process (pollguard serve's) bounds request heads by config.
    configure_server_protocol(config.server.max_head_size, config.server.max_header_fields)
    return PollguardApp(config, path)
