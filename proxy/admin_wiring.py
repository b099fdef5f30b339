"""What the admin app needs beyond probes: the job admin API and the jobs gauge, from config."""

from __future__ import annotations

from typing import Any

from proxy.admin_jobs import JobsApi
from proxy.config import Config
from proxy.guard import JobGuard
from proxy.jobs_gauge import COLLECTOR, JobsGauge
from proxy.policy import GuardLimits

# Records one gauge scan step reads: Redis answers SCAN + HMGET of 1000 keys well within its
# deadline; the memory store lists a job in one step (it walks every record per step anyway).
REDIS_SCAN_STEP = 1000
MEMORY_SCAN_STEP = 100_000


def admin_api(config: Config, guard: JobGuard | None) -> dict[str, Any]:
    """create_admin_app's `tokens`, `jobs` and `jobs_gauge` arguments."""
    tokens = config.admin.active_tokens()
    jobs = JobsApi(config.admin.prefix, tokens, guard)
    gauge = None
    if guard is not None:
        step = MEMORY_SCAN_STEP if not config.state.uses_redis else REDIS_SCAN_STEP

        def limits() -> dict[str, GuardLimits]:  # read per count: a reload may swap the jobs
            assert guard is not None
            return {name: job.limits for name, job in guard.jobs.items()}

        gauge = JobsGauge(guard.store, limits, scan_step=step)
    COLLECTOR.gauge = gauge
    return {"tokens": tokens, "jobs": jobs, "jobs_gauge": gauge}
