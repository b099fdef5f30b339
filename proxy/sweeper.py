"""The sweeper: re-prepare stuck jobs nobody polls (`jobs.<name>.sweep`).

A user who closed the tab stops polling, so no poll ever finds the job stuck. Every `interval`,
one replica (the one that wins the lease `sweep:<job>`, held for the interval; with the memory
store, the one process) lists the job's records with the store's `scan` and re-prepares each
that `judge` picks: unpolled for `idle_after` (by the record's `last_poll`) and stuck by exactly
the judgement a pending poll would get now — `policy.decide` with no Retry-After, REPREPARE only,
so a terminal, in-flight or budget-exhausted episode is left alone; by the backend's clock the
record holds (`policy.stored_clock`: the last answer with hints), else the observed one.

One more condition: the last poll came after the stuck clock last started. A poll is the only
evidence that a job is still pending (a record is observed on pending answers only); after a
re-prepare nobody polled, the job may well be done, and re-preparing it again every
`stuck_after` (up to max_reprepares) could restart a finished job under its returning user. So a
key is swept once per stretch of polling. The re-prepare takes the lock through the same
compare-and-set as a poll (`JobGuard.sweep_reprepare`): a poll or another replica acting first
wins, and the key is re-prepared once.

A pass is bounded: at most MAX_RECORDS_PER_PASS records read, and no re-prepare started after
its lease ends. Passes of one process never overlap (one task, one job after the other); the
re-prepares of a pass are sent one at a time, so a backlog of stuck keys reaches the backend as
a trickle rather than a burst. With no job sweeping, no task runs.

`judge` and `idle_seconds` are pure; `Sweeper` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from proxy.errors import StoreUnavailable
from proxy.headers import new_request_id
from proxy.keyparams import NeedsParams, params_from_key
from proxy.logtext import log_safe
from proxy.metrics import JOB_AGE, SWEEPS
from proxy.policy import GuardLimits, Reprepare, Verdict, decide, stored_clock
from proxy.routes import template_params
from proxy.stores.base import START_CURSOR, EpisodeRecord, JobState

if TYPE_CHECKING:
    from proxy.config import JobConfig
    from proxy.guard import GuardedJob, JobGuard

logger = logging.getLogger("pollguard.sweep")

LEASE_PREFIX = "sweep:"
# Records one pass of one job reads at most: a pass over a store holding more covers the first
# ones it lists, the next pass the same (SCAN order is stable), a warning says so.
MAX_RECORDS_PER_PASS = 10_000
MIN_SLEEP_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class SweepSettings:
    """A plain copy of `jobs.<name>.sweep`; durations in seconds."""

    interval: float
    idle_after: float
    headers: Mapping[str, str]  # lower-case names; stand in for a client's credentials


def sweep_settings(jobs: Mapping[str, JobConfig]) -> dict[str, SweepSettings]:
    """The jobs that sweep, with their settings."""
    return {
        name: SweepSettings(job.sweep.interval, job.sweep.idle_after, dict(job.sweep.headers))
        for name, job in jobs.items()
        if job.sweep is not None
    }


class Skip(StrEnum):
    """Why a scanned record is not swept."""

    INVALID = "invalid"  # unreadable (garbage in Redis)
    NO_POLL_TIME = "no-poll-time"  # the store knows no last poll: idleness can't be shown
    POLLED = "polled"  # polled within idle_after: its own pollers will act
    # Not polled since the stuck clock last (re)started: nobody saw the re-prepared job pending.
    UNSEEN = "not-seen-since-reprepare"


class Judgement(NamedTuple):
    """Whether to sweep a record at `now`: `skip` None means sweep it, with `decision` (a
    REPREPARE, its lock in `decision.locked_state`)."""

    skip: Skip | Verdict | None  # a Skip, or the verdict decide() gave instead of REPREPARE
    idle_seconds: float | None
    pending_seconds: float | None
    decision: Reprepare | None


def idle_seconds(record: EpisodeRecord, now: float) -> float | None:
    """Seconds since the record's last poll; None when unknown."""
    return None if record.last_poll is None else now - record.last_poll


def judge(record: EpisodeRecord, limits: GuardLimits, idle_after: float, now: float) -> Judgement:
    """Sweep a record when nobody polled it for `idle_after`, its last poll saw it pending
    after its stuck clock started, and a pending poll arriving now would re-prepare it."""
    state = record.state
    if state is None:
        return Judgement(Skip.INVALID, None, None, None)
    idle = idle_seconds(record, now)
    if idle is None:
        return Judgement(Skip.NO_POLL_TIME, None, now - state.episode_start, None)
    if idle < idle_after:
        return Judgement(Skip.POLLED, idle, now - state.episode_start, None)
    if record.last_poll is not None and record.last_poll < state.clock_start:
        return Judgement(Skip.UNSEEN, idle, now - state.episode_start, None)
    # By the backend's clock when the record holds one (a job queued for an hour is stuck
    # whatever stuck_after says), else the observed one.
    decision = decide(state, limits, now, None, stored_clock(state, limits, now))
    if type(decision) is not Reprepare:
        return Judgement(decision.verdict, idle, decision.pending_seconds, None)
    return Judgement(None, idle, decision.pending_seconds, decision)


class Action(StrEnum):
    """What the sweeper did with a key it picked (the `outcome` of pollguard_sweeps_total)."""

    REPREPARED = "reprepared"
    FAILED = "reprepare-failed"
    IN_FLIGHT = "reprepare-in-flight"  # a poll or another replica changed the record first
    NEEDS_PARAMS = "needs-params"  # the key does not give the re-prepare path's parameters
    WOULD = "would re-prepare"  # a dry run, or a job in shadow mode


@dataclass(frozen=True, slots=True)
class SweptKey:
    job: str
    key: str
    idle_seconds: float
    pending_seconds: float
    action: Action
    detail: str = ""


_ACTIONS = {
    "succeeded": Action.REPREPARED,
    "failed": Action.FAILED,
    "reprepare-in-flight": Action.IN_FLIGHT,
}


class Sweeper:
    """Sweeps `guard`'s jobs as `settings()` says (read at each pass: a reload may change it).
    `run_once` is one pass; `reconfigured` starts or stops the periodic loop."""

    def __init__(
        self,
        guard: JobGuard,
        settings: Callable[[], Mapping[str, SweepSettings]],
        *,
        scan_step: int,
        max_records: int = MAX_RECORDS_PER_PASS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._guard = guard
        self._settings = settings
        self._scan_step = scan_step
        self._max_records = max_records
        self._clock = clock
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set by a reload: the schedule may have changed
        self._last_pass: dict[str, float] = {}  # job → monotonic start of its last pass

    async def run_once(self, *, dry_run: bool = False, lease: bool = True) -> list[SweptKey]:
        """One pass over every sweeping job; with `lease`, only the jobs whose lease this
        process wins. StoreUnavailable propagates."""
        swept: list[SweptKey] = []
        for name, settings in self._settings().items():
            swept.extend(await self.sweep_job(name, settings, dry_run=dry_run, lease=lease))
        return swept

    async def sweep_job(
        self, name: str, settings: SweepSettings, *, dry_run: bool = False, lease: bool = True
    ) -> list[SweptKey]:
        job = self._guard.jobs.get(name)
        if job is None:
            return []
        store = self._guard.store
        if lease and not await store.claim_lease(LEASE_PREFIX + name, settings.interval):
            return []  # another replica sweeps this job this interval
        # Past the lease another replica may start a pass: start no re-prepare after it.
        deadline = self._monotonic() + settings.interval
        swept: list[SweptKey] = []
        scanned = 0
        cursor: str | None = START_CURSOR
        while cursor is not None:
            if scanned >= self._max_records:
                logger.warning(
                    "sweep of job %s stopped after %d records (the bound per pass)", name, scanned
                )
                break
            step = min(self._scan_step, self._max_records - scanned)
            page = await store.scan(name, cursor, step, self._clock())
            scanned += len(page.records) + page.invalid
            cursor = page.cursor
            for record in page.records:
                # Judged when acted on, not when listed: earlier re-prepares took time.
                judgement = judge(record, job.limits, settings.idle_after, self._clock())
                if judgement.skip is not None:
                    continue
                if self._monotonic() >= deadline:
                    logger.warning(
                        "sweep of job %s stopped at its lease's end (%gs); the next pass goes on",
                        name,
                        settings.interval,
                    )
                    return swept
                swept.append(await self._sweep_key(job, record, judgement, settings, dry_run))
        return swept

    async def _sweep_key(
        self,
        job: GuardedJob,
        record: EpisodeRecord,
        judgement: Judgement,
        settings: SweepSettings,
        dry_run: bool,
    ) -> SweptKey:
        assert judgement.decision is not None
        assert record.state is not None and judgement.idle_seconds is not None
        idle, pending = judgement.idle_seconds, judgement.decision.pending_seconds
        key = record.key
        action, detail = Action.WOULD, ""
        if not dry_run and not job.shadow:
            action, detail = await self._reprepare(
                job, key, record.state, judgement.decision.locked_state, settings
            )
            SWEEPS.labels(job.name, str(action)).inc()
            if action in (Action.REPREPARED, Action.FAILED):
                clock = record.state.hint_clock or "observed"  # the clock judge() used
                JOB_AGE.labels(job.name, str(action), clock).observe(pending)
        swept = SweptKey(job.name, key, idle, pending, action, detail)
        level = logging.WARNING if action in (Action.FAILED, Action.NEEDS_PARAMS) else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "sweep job=%s key=%s idle_seconds=%.1f pending_seconds=%.1f action=%s%s",
                job.name,
                log_safe(key),
                idle,
                pending,
                action,
                f": {log_safe(detail)}" if detail else "",
                extra={
                    "job": job.name,
                    "key": log_safe(key),
                    "idle_seconds": round(idle, 3),
                    "pending_seconds": round(pending, 3),
                    "action": str(action),
                },
            )
        return swept

    async def _reprepare(
        self,
        job: GuardedJob,
        key: str,
        state: JobState,
        locked: JobState,
        settings: SweepSettings,
    ) -> tuple[Action, str]:
        try:
            # The routes guarded now: a reload may have swapped them.
            params = params_from_key(
                self._guard.rules.routes.specs, job.name, key, template_params(job.reprepare.path)
            )
        except NeedsParams as exc:
            return Action.NEEDS_PARAMS, str(exc)
        outcome = await self._guard.sweep_reprepare(
            job.name, key, params, state, locked, settings.headers, new_request_id()
        )
        return _ACTIONS[outcome.outcome], outcome.detail

    # The periodic loop.

    @property
    def running(self) -> bool:
        """Whether the periodic loop runs (some job sweeps)."""
        return self._task is not None and not self._task.done()

    def reconfigured(self) -> None:
        """Run the loop while some job sweeps, and none otherwise (at startup, after a reload)."""
        if self._settings():
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._run())
            self._wake.set()
        elif self._task is not None:
            self._task.cancel()  # a re-prepare in flight finishes: JobGuard shields it
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while (delay := await self.tick()) is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    async def tick(self) -> float | None:
        """Sweep every job whose interval has passed since its last pass (the first one
        interval after the loop first saw it); return the seconds to sleep until the next, or
        None when no job sweeps any more."""
        settings = self._settings()
        for name in [name for name in self._last_pass if name not in settings]:
            del self._last_pass[name]
        for name, job_settings in settings.items():
            started = self._monotonic()
            last = self._last_pass.setdefault(name, started)
            if started < last + job_settings.interval:
                continue
            self._last_pass[name] = started
            try:
                await self.sweep_job(name, job_settings)
            except StoreUnavailable as exc:
                logger.warning("sweep of job %s skipped: %s", name, log_safe(str(exc)))
            except Exception:  # a bug of ours: logged, and the next pass tries again
                logger.exception("sweep of job %s failed", name)
        now = self._monotonic()
        waits = [self._last_pass[name] + s.interval - now for name, s in settings.items()]
        return max(MIN_SLEEP_SECONDS, min(waits)) if waits else None
