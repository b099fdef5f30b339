"""The legacy backend's job queue and worker, with the fault modes that reproduce its bugs.

One `Backend` lives inside one simulator event loop. Reads from other threads (the demo's
timeline, tests) go through `snapshot()`, which is guarded by a lock for that reason."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from proxy.demo.catalog import DEFAULT_RECORDING_SIZE

WORKER_POLL_INTERVAL_SECONDS = 0.02
DEFAULT_DOWNLOAD_SECONDS = 0.5
DEFAULT_RETRY_AFTER_SECONDS = 2

EventListener = Callable[[str, str], None]


class WorkerMode(StrEnum):
    OK = "ok"
    OFFLINE = "offline"  # never picks up a job: every job stays queued forever
    STALL_FIRST = "stall-first"  # the first job of each call hangs forever, later ones succeed
    CRASH_MID_JOB = "crash-mid-job"  # dies halfway through every job, leaving it "running"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class StuckJobs(StrEnum):
    """What the jobs the simulator starts with (`stuck_for` ago) look like."""

    QUEUED = "queued"  # never picked up
    RUNNING = "running"  # started when created, then hung
    RUNNING_NO_START = "running-no-start"  # "running", but no started_at was ever written


@dataclass(frozen=True)
class Faults:
    """What is broken right now; switchable at run time."""

    worker_mode: WorkerMode = WorkerMode.OK
    prepare_fails: bool = False
    latency_seconds: float = 0.0


@dataclass(frozen=True)
class SimulatorSettings:
    faults: Faults = field(default_factory=Faults)
    download_seconds: float = DEFAULT_DOWNLOAD_SECONDS
    retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
    recording_size: int = DEFAULT_RECORDING_SIZE
    # > 0: every recorded call starts with a job created this many seconds ago that never
    # finishes (the state a backend is in when pollguard gets deployed in front of it).
    stuck_for: float = 0.0
    stuck_jobs: StuckJobs = StuckJobs.QUEUED


@dataclass
class Job:
    run_id: str
    call_sid: str
    number: int  # 1 for the call's first job, 2 for the next, ...
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)  # wall clock, as the backend's DB
    started_at: float | None = None
    stuck: bool = False  # seeded stuck: the worker never picks it up
    # Every status the job has had, in order: a status feed replays what it has not sent yet,
    # so a client sees each step even when two happen between its looks.
    history: list[JobStatus] = field(default_factory=lambda: [JobStatus.QUEUED])

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "call_sid": self.call_sid,
            "job_number": self.number,
            "status": str(self.status),
            "created_at": iso_utc(self.created_at),
            "started_at": None if self.started_at is None else iso_utc(self.started_at),
        }


def iso_utc(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as the legacy backend writes its times."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True)
class JobHistory:
    """One job as a status feed sees it."""

    run_id: str
    number: int
    statuses: tuple[JobStatus, ...]


class Backend:
    """Jobs, ready recordings, counters, and the worker loop."""

    def __init__(
        self,
        settings: SimulatorSettings,
        on_event: EventListener | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.faults = settings.faults
        self._on_event = on_event
        self._lock = threading.Lock()
        self._run_ids = itertools.count(1)
        self._jobs: dict[str, Job] = {}
        self._active_by_call: dict[str, str] = {}
        self._ready: set[str] = set()
        self._jobs_created: Counter[str] = Counter()
        self._forced_prepares: Counter[str] = Counter()
        self._requests: dict[str, Counter[int]] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()

    # -- queries ---------------------------------------------------------------------------------
    def is_ready(self, call_sid: str) -> bool:
        return call_sid in self._ready

    def active_job(self, call_sid: str) -> Job | None:
        run_id = self._active_by_call.get(call_sid)
        job = self._jobs.get(run_id) if run_id else None
        return job if job is not None and job.status in ACTIVE_STATUSES else None

    def job(self, run_id: str) -> Job | None:
        return self._jobs.get(run_id)

    def call_jobs(self, call_sid: str) -> tuple[list[JobHistory], bool]:
        """Every job of `call_sid` in creation order with its status history, and whether the
        recording is ready, read together (one lock) so the two always agree."""
        with self._lock:
            jobs = [
                JobHistory(job.run_id, job.number, tuple(job.history))
                for job in self._jobs.values()
                if job.call_sid == call_sid
            ]
            return jobs, call_sid in self._ready

    def snapshot(self) -> dict[str, Any]:
        """Counters as plain JSON: jobs created and forced prepares per call, requests per
        endpoint and status, and every job."""
        with self._lock:
            return {
                "faults": {
                    "worker_mode": str(self.faults.worker_mode),
                    "prepare_fails": self.faults.prepare_fails,
                    "latency_ms": round(self.faults.latency_seconds * 1000),
                },
                "jobs_created": dict(self._jobs_created),
                "forced_prepares": dict(self._forced_prepares),
                "requests": {
                    endpoint: {str(status): n for status, n in by_status.items()}
                    for endpoint, by_status in self._requests.items()
                },
                "jobs": [job.as_json() for job in self._jobs.values()],
                "ready": sorted(self._ready),
            }

    # -- commands --------------------------------------------------------------------------------
    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self.faults = faults
        self._emit(
            "-",
            f"faults now worker={faults.worker_mode} prepare_fails="
            f"{faults.prepare_fails} latency={faults.latency_seconds:g}s",
        )

    def update_faults(self, **changes: Any) -> Faults:
        self.set_faults(replace(self.faults, **changes))
        return self.faults

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests.setdefault(endpoint, Counter())[status] += 1

    def enqueue(
        self, call_sid: str, *, created_at: float | None = None, quiet: bool = False
    ) -> Job:
        with self._lock:
            self._jobs_created[call_sid] += 1
            job = Job(
                run_id=f"run-{next(self._run_ids)}",
                call_sid=call_sid,
                number=self._jobs_created[call_sid],
                created_at=self._clock() if created_at is None else created_at,
            )
            self._jobs[job.run_id] = job
            self._active_by_call[call_sid] = job.run_id
        if not quiet:
            self._emit(call_sid, f"backend: job #{job.number} queued ({job.run_id})")
        return job

    def seed_stuck(self, call_sids: Iterable[str]) -> int:
        """Give each call a job created `settings.stuck_for` seconds ago that never finishes by
        itself (a forced prepare replaces it); the number of jobs seeded."""
        created = self._clock() - self.settings.stuck_for
        kind = self.settings.stuck_jobs
        seeded = 0
        for call_sid in call_sids:
            job = self.enqueue(call_sid, created_at=created, quiet=True)
            with self._lock:
                job.stuck = True
                if kind is not StuckJobs.QUEUED:
                    job.status = JobStatus.RUNNING
                    job.history.append(JobStatus.RUNNING)
                    job.started_at = created if kind is StuckJobs.RUNNING else None
            seeded += 1
        self._emit("-", f"backend: {seeded} jobs stuck {kind} for {self.settings.stuck_for:g}s")
        return seeded

    def force_replace(self, call_sid: str) -> Job:
        """`prepare?force=1`: fail the active job (if any) and enqueue a fresh one."""
        with self._lock:
            self._forced_prepares[call_sid] += 1
        old = self.active_job(call_sid)
        if old is not None:
            self._set_status(old, JobStatus.FAILED)
            self._emit(call_sid, f"backend: forced prepare marks job #{old.number} failed")
        return self.enqueue(call_sid)

    def cancel(self, job: Job) -> None:
        if job.status in ACTIVE_STATUSES:
            self._set_status(job, JobStatus.CANCELLED)
            self._emit(job.call_sid, f"backend: job #{job.number} cancelled")

    # -- worker ----------------------------------------------------------------------------------
    async def run_worker(self) -> None:
        """Pick up queued jobs in creation order until cancelled."""
        try:
            while True:
                if self.faults.worker_mode is not WorkerMode.OFFLINE:
                    for job in self._queued_jobs():
                        self._set_status(job, JobStatus.RUNNING)
                        with self._lock:
                            job.started_at = self._clock()
                        task = asyncio.create_task(self._work_on(job))
                        self._job_tasks.add(task)
                        task.add_done_callback(self._job_tasks.discard)
                await asyncio.sleep(WORKER_POLL_INTERVAL_SECONDS)
        finally:
            for task in list(self._job_tasks):
                task.cancel()

    def _queued_jobs(self) -> list[Job]:
        with self._lock:
            return [
                job
                for job in self._jobs.values()
                if job.status is JobStatus.QUEUED and not job.stuck
            ]

    async def _work_on(self, job: Job) -> None:
        mode = self.faults.worker_mode
        if mode is WorkerMode.STALL_FIRST and job.number == 1:
            self._emit(job.call_sid, f"backend: job #{job.number} hangs (stall-first)")
            return  # stays "running" forever: the legacy bug
        if mode is WorkerMode.CRASH_MID_JOB:
            await asyncio.sleep(self.settings.download_seconds / 2)
            self._emit(job.call_sid, f"backend: worker crashed mid job #{job.number}")
            return  # nobody ever updates the job again
        await asyncio.sleep(self.settings.download_seconds)
        if job.status is not JobStatus.RUNNING:
            return  # failed or cancelled while downloading: its result is thrown away
        with self._lock:
            job.status = JobStatus.SUCCEEDED
            job.history.append(JobStatus.SUCCEEDED)
            self._ready.add(job.call_sid)
            if self._active_by_call.get(job.call_sid) == job.run_id:
                del self._active_by_call[job.call_sid]
        self._emit(job.call_sid, f"backend: job #{job.number} done, recording ready")

    def _set_status(self, job: Job, status: JobStatus) -> None:
        with self._lock:
            job.status = status
            job.history.append(status)

    def _emit(self, call_sid: str, message: str) -> None:
        if self._on_event is not None:
            self._on_event(call_sid, message)
