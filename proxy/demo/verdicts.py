"""What each demo run must end in, with and without pollguard in front."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.demo.backend import WorkerMode
from proxy.demo.client import ClientResult, Outcome
from proxy.demo.events import NORMAL_CLOSURE
from proxy.demo.live import LiveOutcome, LiveResult
from proxy.demo.scenarios import ClientKind, Path, Scenario
from proxy.policy import GuardLimits

UNAUTHENTICATED = 401
LIVE_STEPS = ("#1 queued", "#1 running", "#1 ready")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    expected: str


def judge(
    scenario: Scenario,
    path: Path,
    result: ClientResult,
    jobs_created: int,
    timings: GuardLimits,
    back: ClientResult | None = None,
) -> Verdict:
    """Did this run end the way pollguard promises (or, direct, the way the bug predicts)?
    `back`: a returning user's second visit (its part of `result`)."""
    played = result.outcome is Outcome.PLAYED
    if scenario.worker_mode is WorkerMode.OK and scenario.stuck_for == 0:
        return Verdict(played and jobs_created == 1, "plays, 1 job")
    if path is Path.DIRECT:
        # Without pollguard the stuck job is never replaced and the client only stops on its own.
        return Verdict(
            result.outcome is Outcome.GAVE_UP and jobs_created == 1,
            "bug: client gives up, job never replaced",
        )
    if scenario.client is ClientKind.RETURNING:
        # Nobody polled while the job was re-prepared: the player saw no re-prepare, and its
        # first poll on return got the recording.
        at_once = back is not None and back.statuses[:1] == (200,)
        return Verdict(
            played and at_once and result.reprepares_seen == 0 and jobs_created == 2,
            "swept while away: plays on return, 2 jobs",
        )
    if scenario.stuck_for > 0:
        return _judge_already_stuck(scenario, result, jobs_created, timings)
    if scenario.worker_mode is WorkerMode.STALL_FIRST:
        return Verdict(played and jobs_created == 2, "plays after 1 re-prepare, 2 jobs")
    max_jobs = 1 + timings.max_reprepares
    return Verdict(
        result.outcome is Outcome.TERMINAL
        and result.problem_code == "job-stuck"
        and jobs_created <= max_jobs,
        f"clean 500 job-stuck, <= {max_jobs} jobs",
    )


def first_reprepare_at(result: ClientResult) -> float | None:
    """Seconds into the run of the first poll pollguard answered with a re-prepare."""
    return next((e.elapsed for e in result.events if e.reprepared), None)


def _judge_already_stuck(
    scenario: Scenario, result: ClientResult, jobs_created: int, timings: GuardLimits
) -> Verdict:
    """The seeded job plus the re-prepared one; with hints the very first poll re-prepares,
    without them pollguard's own clock starts at that poll and runs stuck_after."""
    played = result.outcome is Outcome.PLAYED and jobs_created == 2
    if scenario.hints:
        first_poll = result.events[0].reprepared if result.events else False
        return Verdict(played and first_poll, "1st poll re-prepares (hints); plays, 2 jobs")
    reprepared_at = first_reprepare_at(result)
    return Verdict(
        played and reprepared_at is not None and reprepared_at >= timings.stuck_after,
        f"re-prepared after stuck_after ({timings.stuck_after:g}s); plays, 2 jobs",
    )


def judge_live(result: LiveResult, jobs_created: int) -> Verdict:
    """A WebSocket passes through pollguard untouched: both paths must see the same feed — the
    backend's own 401 without credentials, every step of the one job, the greeting acknowledged,
    and the backend's 1000 close."""
    return Verdict(
        result.outcome is LiveOutcome.FOLLOWED
        and result.unauthenticated_status == UNAUTHENTICATED
        and result.statuses == LIVE_STEPS
        and result.acked
        and result.close_code == NORMAL_CLOSURE
        and jobs_created == 1,
        "401 without token; queued, running, ready; ack; 1000",
    )


def outcome_text(result: ClientResult | LiveResult) -> str:
    if isinstance(result, LiveResult):
        if result.outcome is LiveOutcome.FOLLOWED:
            return f"followed to ready, {result.close_code}"
        if result.outcome is LiveOutcome.CLOSED:
            return f"closed {result.close_code} {result.close_reason}".rstrip()
        return f"{result.outcome} {result.error}".strip()
    if result.outcome is Outcome.TERMINAL:
        code = result.problem_code or "?"
        return f"{result.statuses[-1] if result.statuses else '?'} {code}"
    if result.outcome is Outcome.PLAYED:
        return "played, bytes+range ok"
    if result.outcome is Outcome.GAVE_UP:
        return f"gave up after {result.polls} polls"
    return f"{result.outcome} {result.error}".strip()


def exchanges_text(result: ClientResult | LiveResult) -> str:
    """The table's polls/msgs column: polls made, or feed messages received."""
    if isinstance(result, LiveResult):
        return f"{result.messages} msgs"
    return str(result.polls)
