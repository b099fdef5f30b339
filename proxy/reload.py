"""Config reload: SIGHUP (or POST <admin.prefix>reload) re-reads the config file.

What takes effect: `jobs` and `routes`, swapped into the guard in one assignment (a request that
already found its job finishes on it). Everything else — upstream.*, server.*, state.*, admin.*,
websocket.*, logging.* — is built into sockets, pools, the store and the admin app at startup,
so a change there is reported as "restart required", by dotted path, and the running value is
kept. An invalid file changes nothing: the error, which names the field, is logged.

A process started without routes has no guard (and no store): routes added by a reload are
reported as restart required ("routes") rather than building a store and a guard at run time.

One reload runs at a time per process; signals arriving meanwhile coalesce into one more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.metrics import CONFIG_RELOADS

logger = logging.getLogger("pollguard.reload")

RELOAD_SIGNAL = signal.SIGHUP
# Set by `pollguard serve` for the processes that run the app: they handle SIGHUP themselves.
SERVE_ENV = "POLLGUARD_SERVE"
# Set by pollguard's supervisor (`serve --workers N`, N > 1) to its pid: a worker reloaded by
# POST reload asks it, with SIGHUP, to have every worker reload.
SUPERVISOR_ENV = "POLLGUARD_SUPERVISOR_PID"
# Sections a reload applies; every other field needs a restart.
APPLIED = ("jobs", "routes")
# A config file is a few KB; a larger one is refused before it is read.
MAX_CONFIG_BYTES = 1024 * 1024

Result = Literal["reloaded", "unchanged", "invalid"]


def changed_fields(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields whose values differ, nested sections walked field by field.
    Names only: values (secrets among them) are never part of the answer."""
    changed: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if isinstance(before, BaseModel) and type(before) is type(after):
            changed.extend(changed_fields(before, after, f"{prefix}{name}."))
        elif before != after:
            changed.append(prefix + name)
    return changed


def restart_required(running: Config, new: Config) -> list[str]:
    """The dotted fields that differ outside `jobs` and `routes`: a reload cannot apply them."""
    return [path for path in changed_fields(running, new) if path.split(".")[0] not in APPLIED]


def job_changes(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """`name (added|removed|changed)` for every job that is not the same in both."""
    changes = [f"{name} (removed)" for name in old if name not in new]
    for name, job in new.items():
        if name not in old:
            changes.append(f"{name} (added)")
        elif old[name] != job:
            changes.append(f"{name} (changed)")
    return changes


@dataclass(frozen=True)
class ReloadPlan:
    """What a valid new config does to a running one."""

    effective: Config  # what the process runs afterwards: the running config, new jobs/routes
    restart_required: tuple[str, ...]
    jobs: tuple[str, ...]  # job_changes
    routes_changed: bool

    @property
    def changed(self) -> bool:
        return bool(self.jobs) or self.routes_changed

    @property
    def result(self) -> Result:
        return "reloaded" if self.changed else "unchanged"


def plan_reload(running: Config, new: Config, *, guarded: bool) -> ReloadPlan:
    """The reload of `running` to `new`. `guarded`: the process has a guard (it started with
    routes); without one, routes cannot be added by a reload."""
    restart = restart_required(running, new)
    if not guarded and new.routes:
        # No store, no guard, no re-preparer were built at startup: nothing to swap into.
        return ReloadPlan(running, (*restart, "routes"), (), False)
    effective = running.model_copy(update={"jobs": new.jobs, "routes": new.routes})
    return ReloadPlan(
        effective,
        tuple(restart),
        tuple(job_changes(running.jobs, new.jobs)),
        running.routes != new.routes,
    )


@dataclass(frozen=True)
class ReloadOutcome:
    result: Result
    restart_required: tuple[str, ...] = ()
    error: str | None = None  # the ConfigError text, naming the field, when invalid


def read_config(path: str) -> Config:
    """load_config, refusing first what is not a regular file of at most MAX_CONFIG_BYTES (a
    FIFO or device would block or never end)."""
    try:
        info = os.stat(path)
    except OSError:
        pass  # load_config says what is wrong with it
    else:
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file — point at a config.yaml")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {info.st_size} bytes, larger than the {MAX_CONFIG_BYTES} a config "
                "file may have — is this the config file?"
            )
    return load_config(path)


class Reconfigurable(Protocol):
    """The app as a reload sees it (proxy.app.PollguardApp)."""

    config: Config

    @property
    def guarded(self) -> bool: ...

    def reconfigure(self, config: Config) -> None: ...


class Reloader:
    """Reloads `app` from the config file at `path`, one reload at a time."""

    def __init__(
        self,
        path: str,
        app: Reconfigurable,
        read: Callable[[str], Config] = read_config,
    ) -> None:
        self.path = path
        self._app = app
        self._read = read
        self._lock = asyncio.Lock()
        self._signalled = False
        self._signal_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when this process asked the supervisor to reload every worker: the SIGHUP that
        # comes back to it re-reads the file but, finding it unchanged, counts and logs nothing.
        self._echo_expected = False

    async def reload(self, *, quiet_if_unchanged: bool = False) -> ReloadOutcome:
        """Re-read the file and apply it; invalid, the running config stays."""
        async with self._lock:
            try:
                # A thread: a large or slow file must not stall the requests in flight.
                new = await asyncio.to_thread(self._read, self.path)
            except ConfigError as exc:
                CONFIG_RELOADS.labels("invalid").inc()
                logger.error("config reload failed, the running config is kept: %s", exc)
                return ReloadOutcome("invalid", error=str(exc))
            plan = plan_reload(self._app.config, new, guarded=self._app.guarded)
            if plan.changed:
                self._app.reconfigure(plan.effective)
            elif quiet_if_unchanged:
                return ReloadOutcome("unchanged", plan.restart_required)
            CONFIG_RELOADS.labels(plan.result).inc()
            self._log(plan)
            return ReloadOutcome(plan.result, plan.restart_required)

    def _log(self, plan: ReloadPlan) -> None:
        config = plan.effective
        jobs = ", ".join(plan.jobs) if plan.jobs else "unchanged"
        routes = "changed" if plan.routes_changed else "unchanged"
        logger.info(
            "config reloaded from %s by process %d: jobs %s; routes %s; %d job(s) and %d "
            "route(s) in effect",
            self.path,
            os.getpid(),
            jobs,
            routes,
            len(config.jobs),
            len(config.routes),
        )
        for field in plan.restart_required:
            if field == "routes":
                logger.warning(
                    "config reload: routes added to a config that had none — restart pollguard "
                    "to guard them (it started without a guard or a job state store)"
                )
            else:
                logger.warning(
                    "config reload: %s changed but needs a restart to take effect; the running "
                    "value is kept",
                    field,
                )

    async def reload_all(self) -> ReloadOutcome:
        """POST reload: this process now, and under pollguard's supervisor every other worker
        too (the supervisor forwards SIGHUP to each)."""
        outcome = await self.reload()
        if outcome.result != "invalid":
            supervisor = supervisor_pid()
            if supervisor is not None:
                self._echo_expected = True
                os.kill(supervisor, RELOAD_SIGNAL)
        return outcome

    def on_signal(self) -> None:
        """SIGHUP: reload soon. While a reload runs, further signals make one more, not many."""
        self._signalled = True
        if self._signal_task is None or self._signal_task.done():
            self._signal_task = asyncio.ensure_future(self._reload_signalled())

    async def _reload_signalled(self) -> None:
        while self._signalled:
            self._signalled = False
            echo, self._echo_expected = self._echo_expected, False
            try:
                await self.reload(quiet_if_unchanged=echo)
            except Exception:  # a bug of ours; the next SIGHUP tries again
                logger.exception("config reload raised")

    def install_signal_handler(self) -> bool:
        """Reload on SIGHUP (the event loop's handler; the main thread only)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(RELOAD_SIGNAL, self.on_signal)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            logger.warning("SIGHUP cannot reload the config here (%s); use POST reload", exc)
            return False
        self._loop = loop
        return True

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(RELOAD_SIGNAL)
            # Not SIGHUP's default (ending the process) for the last moments of a shutdown.
            signal.signal(RELOAD_SIGNAL, signal.SIG_IGN)
            self._loop = None
        task = self._signal_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def supervisor_pid() -> int | None:
    """The pid of pollguard's supervisor when this process is one of its workers (and it is
    still this process's parent), else None."""
    value = os.environ.get(SUPERVISOR_ENV, "")
    if not value.isdigit():
        return None
    pid = int(value)
    return pid if pid == os.getppid() else None


def under_serve() -> bool:
    """Whether `pollguard serve` runs this process (it then owns SIGHUP)."""
    return os.environ.get(SERVE_ENV) == "1"
