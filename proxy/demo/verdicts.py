"""What each demo run must end in, with and without pollguard in front."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.demo.backend import WorkerMode
from proxy.demo.client import ClientResult, Outcome
from proxy.demo.guard_config import GuardTimings
from proxy.demo.scenarios import Path, Scenario


@dataclass(frozen=True)
class Verdict:
    ok: bool
    expected: str


def judge(
    scenario: Scenario, path: Path, result: ClientResult, jobs_created: int, timings: GuardTimings
) -> Verdict:
    """Did this run end the way pollguard promises (or, direct, the way the bug predicts)?"""
    played = result.outcome is Outcome.PLAYED
    if scenario.worker_mode is WorkerMode.OK:
        return Verdict(played and jobs_created == 1, "plays, 1 job")
    if path is Path.DIRECT:
        # Without pollguard the stuck job is never replaced and the client only stops on its own.
        return Verdict(
            result.outcome is Outcome.GAVE_UP and jobs_created == 1,
            "bug: client gives up, job never replaced",
        )
    if scenario.worker_mode is WorkerMode.STALL_FIRST:
        return Verdict(played and jobs_created == 2, "plays after 1 re-prepare, 2 jobs")
    max_jobs = 1 + timings.max_reprepares
    return Verdict(
        result.outcome is Outcome.TERMINAL
        and result.problem_code == "job-stuck"
        and jobs_created <= max_jobs,
        f"clean 500 job-stuck, <= {max_jobs} jobs",
    )


def outcome_text(result: ClientResult) -> str:
    if result.outcome is Outcome.TERMINAL:
        code = result.problem_code or "?"
        return f"{result.statuses[-1] if result.statuses else '?'} {code}"
    if result.outcome is Outcome.PLAYED:
        return "played, bytes+range ok"
    if result.outcome is Outcome.GAVE_UP:
        return f"gave up after {result.polls} polls"
    return f"{result.outcome} {result.error}".strip()
