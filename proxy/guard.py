"""Where the job policy meets I/O: the store, the re-prepare request, the answer to send.

The handler calls `review` with the upstream's response head on a guarded route; the answer is
either None (pass the upstream response through untouched), or a `GuardAnswer` carrying the
status and headers to send and, when pollguard replaces the upstream body, that body.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, NamedTuple

from proxy import answers
from proxy.answers import GuardAnswer, ProblemContext
from proxy.errors import StoreUnavailable
from proxy.headers import RawHeaders, header_value
from proxy.hints import NO_HINTS, ClockReading, ClockRules, HintReading, HintsConfig, backend_clock
from proxy.logformat import rfc3339
from proxy.logtext import log_safe
from proxy.loop_metrics import Tally
from proxy.metrics import DECISIONS, JOB_AGE, REPREPARES, STORE_ERRORS
from proxy.policy import (
    OBSERVED,
    Answered,
    Decision,
    GuardLimits,
    InFlight,
    Pass,
    Reprepare,
    Verdict,
    after_reprepare,
    cooldown_retry_after,
    decide,
    ends_episode,
    judge_clock,
    pass_retry_after,
    record_ttl,
    reprepared_at,
    with_clock,
)
from proxy.probe import Prober, ProbeRequest
from proxy.recent import RecentRecords, trust_seconds
from proxy.reprepare import Repreparer, ReprepareRequest, ReprepareResult, idempotency_key
from proxy.routes import RouteMatch, RouteTable, is_guardable_key
from proxy.shield import Shield
from proxy.stores import JobState, JobStore

logger = logging.getLogger("pollguard.guard")

STORE_ERROR_LOG_INTERVAL = 10.0  # seconds between two "store unavailable" log lines
# Request targets whose routing outcome is remembered: a job's pollers repeat the same path, and
# matching one afresh (regex, parameter checks, key, two objects) cost ~30k instructions of a
# ~360k guarded 202. Bounded, since clients choose paths: emptied when full (no bookkeeping on
# a hit; a miss costs what no cache would), and only short targets are kept, so it holds a few
# MB at worst (~1.7 KB per entry with both paths at the limit).
TARGET_CACHE_SIZE = 4096
TARGET_CACHE_MAX_PATH = 256  # characters of the path, bytes of the raw path
_PASS = str(Verdict.PASS)
# Decisions that escalate an episode, each observed in pollguard_job_age_seconds: the outcome of
# every re-prepare, and every terminal answer sent.
_ESCALATIONS = frozenset({"reprepared", "reprepare-failed", "job-stuck", "wait-exceeded"})
# What the lock is released with when the re-prepare never reported (cancelled, or a bug).
_INTERRUPTED = ReprepareResult(False, "re-prepare interrupted before it reported")
# Keys whose backend time was ignored for skew (hints.max_skew), each logged once; bounded
# (emptied when full), since keys come from clients.
SKEW_LOG_KEYS = 4096


class _NeedsStore(enum.Enum):
    NEEDS_STORE = "needs-store"


# What `review_at_once` answers when the decision needs the shared store (or a re-prepare).
NEEDS_STORE: Final = _NeedsStore.NEEDS_STORE
AtOnce = GuardAnswer | None | Literal[_NeedsStore.NEEDS_STORE]


@dataclass(frozen=True, slots=True)
class GuardedJob:
    name: str
    shadow: bool
    pending_status: frozenset[int]
    # Non-pending statuses that mean the result is there and end the episode; anything else
    # (a 404 or 403 another tenant got for the same key) leaves the state alone.
    end_status: frozenset[int]
    key_pattern: re.Pattern[str] | None
    limits: GuardLimits
    reprepare: ReprepareRequest
    # Identical polls in flight share one upstream request (proxy.coalesce).
    coalesce: bool = True
    # Seconds a pending answer is reused across replicas (proxy.shield); 0: off.
    min_poll_interval: float = 0.0
    # The backend's own clocks (proxy.hints): None, None for a job without hints.
    hints: HintsConfig | None = None
    clock_rules: ClockRules | None = None
    # The status probe (proxy.probe), for answers that carry no status; None: none.
    probe: ProbeRequest | None = None
    # How long the job's records live, derived from its limits once, not per poll; carried by
    # the job so a request still holding it after a reload removed the job keeps its TTL.
    record_ttl: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "record_ttl", record_ttl(self.limits))


@dataclass(frozen=True, slots=True)
class GuardTarget:
    job: GuardedJob
    match: RouteMatch


class GuardedPoll(NamedTuple):
    """One guarded request's pending answer, as the guard judges it: built once per request
    (by the forwarder, when the upstream's head arrives) and handed whole through the guard's
    methods. More facts about the poll (e.g. hints read from the pending body) belong here,
    as fields with a default. A NamedTuple: built on every guarded poll (see policy.Pass)."""

    target: GuardTarget
    status: int  # the upstream's
    upstream_headers: RawHeaders  # the answer's end-to-end fields, our request id included
    client_headers: Sequence[tuple[bytes, bytes]]  # what the client sent (for the re-prepare)
    request_id: bytes
    # What the pending answer says about its job (jobs with hints only; the forwarder reads it).
    hints: HintReading = NO_HINTS
    # The clock that decided (set by the guard once it has the record: the backend's clock
    # depends on the episode's last re-prepare): for log lines, metrics and the problem body.
    clock: ClockReading = OBSERVED


@dataclass(frozen=True, slots=True)
class ForcedOutcome:
    """What an operator's re-prepare (`JobGuard.force_reprepare`) came to."""

    outcome: str  # "succeeded", "failed", "reprepare-in-flight", "reprepare-budget-exhausted"
    detail: str
    attempts: int
    before: JobState  # the record as observed before the lock was taken


class GuardRules:
    """What one config says the guard guards: its jobs, its route table, and the routing
    outcomes remembered for them (see TARGET_CACHE_SIZE). Swapped whole by `reconfigure`, so a
    request that resolved its target keeps the job it found, and no cached target outlives the
    rules it came from."""

    __slots__ = ("jobs", "routes", "targets")

    def __init__(self, jobs: Mapping[str, GuardedJob], routes: RouteTable) -> None:
        self.jobs = jobs
        self.routes = routes
        # (method, path, raw_path) → what target() answers for it.
        self.targets: dict[tuple[str, str, bytes | None], GuardTarget | None] = {}


class JobGuard:
    def __init__(
        self,
        jobs: Mapping[str, GuardedJob],
        routes: RouteTable,
        store: JobStore,
        repreparer: Repreparer,
        *,
        fail_closed: bool,
        remembered_records: int = 0,
        clock: Callable[[], float] = time.time,
        prober: Prober | None = None,
    ) -> None:
        self._rules = GuardRules(jobs, routes)
        self.store = store
        self._repreparer = repreparer
        # Jobs with `probe` probe only when one is given (pollguard serve builds it).
        self._prober = prober
        self._skew_logged: set[tuple[str, str]] = set()
        self._fail_closed = fail_closed
        self._clock = clock
        self._last_store_error_log = -math.inf
        self._background: set[asyncio.Task[Any]] = set()
        # Each (job, decision, mode)'s series of pollguard_decisions, found once.
        self._decision_tallies: dict[tuple[str, str, str], Tally] = {}
        # Replica-local memory of records read from a shared store; 0 = none.
        self._remembered_records = remembered_records
        self._recent = RecentRecords(remembered_records) if remembered_records else None
        # The cross-replica herd shield over the same store (jobs with min_poll_interval).
        self.shield = Shield(store, clock=clock)

    @property
    def rules(self) -> GuardRules:
        return self._rules

    def reconfigure(self, jobs: Mapping[str, GuardedJob], routes: RouteTable) -> None:
        """Guard new requests by `jobs` and `routes` (a config reload), in one assignment and
        without a lock: a request that already has its target finishes on the job it found.
        Records remembered from the shared store are forgotten (their trust came from the old
        limits); the records themselves, in the store, stay."""
        self._rules = GuardRules(jobs, routes)
        if self._recent is not None:
            self._recent = RecentRecords(self._remembered_records)

    async def settled(self) -> None:
        """Wait for the background work started so far (forgetting ended episodes): for an
        orderly shutdown before the store closes, and for tests."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.shield.settled()

    def target(self, method: str, path: str, raw_path: bytes | None = None) -> GuardTarget | None:
        """The job a request belongs to, or None for an unguarded request. `path` is the decoded
        ASGI path; `raw_path`, when given, lets a path with an encoded slash go unguarded."""
        rules = self._rules  # one load: a reload swapping it mid-call cannot mix two configs
        if not rules.routes.may_match(path):
            return None  # most unguarded requests: one prefix test, nothing cached
        request = (method, path, raw_path)
        targets = rules.targets
        try:
            return targets[request]
        except KeyError:
            pass
        found = _find_target(rules, method, path, raw_path)
        if len(path) <= TARGET_CACHE_MAX_PATH and (
            raw_path is None or len(raw_path) <= TARGET_CACHE_MAX_PATH
        ):
            if len(targets) >= TARGET_CACHE_SIZE:
                targets.clear()
            targets[request] = found
        return found

    def review_at_once(self, poll: GuardedPoll) -> AtOnce:
        """`review` for the answers that need no I/O, without a coroutine (most polls): any
        answer that is not pending, and a PASS decided from a record this process holds (the
        memory store's own, or one remembered from Redis). NEEDS_STORE: await `review_shared`."""
        target = poll.target
        job, key = target.job, target.match.key
        status = poll.status
        if status not in job.pending_status:
            self._not_pending(job, key, status)
            return None
        now = self._clock()
        if self._recent is not None:
            state = self._recent.get(job.name, key, now)
        else:
            state = self.store.observe_local(job.name, key, now, job.record_ttl)
        if state is None:
            return NEEDS_STORE
        if job.clock_rules is not None:
            return self._hinted_at_once(poll, state, now)
        upstream_headers = poll.upstream_headers
        raw_retry_after = header_value(upstream_headers, b"retry-after")
        retry_after = raw_retry_after.decode("latin-1") if raw_retry_after else None
        # Only PASS may be decided from a record held here (true of any newer one too);
        # everything else reads the shared record.
        if logger.isEnabledFor(logging.INFO):
            # The decision line needs decide()'s whole decision (pending time, attempts).
            decision = decide(state, job.limits, now, retry_after)
            if type(decision) is not Pass or decision.record is not None:
                return NEEDS_STORE  # a PASS with a record: a new episode, to be written
            if job.shadow:
                self._log(poll, _PASS, decision)
                return None
            return self._answer(poll, decision)
        seconds = pass_retry_after(state, job.limits, now, retry_after)
        if seconds is None:
            return NEEDS_STORE
        self._count(target, _PASS)
        return None if job.shadow else answers.pending(status, upstream_headers, seconds)

    def _hinted_at_once(self, poll: GuardedPoll, state: JobState, now: float) -> AtOnce:
        """review_at_once for a job with hints: decide() by the clock that applies (not the
        observed-clock fast path, pass_retry_after), answered at once only for a PASS that
        writes nothing — the record already holds this clock, and no probe is due."""
        job, key = poll.target.job, poll.target.match.key
        if (
            job.probe is not None
            and poll.hints.status.value is None
            and self._prober is not None
            and self._prober.due(job.name, key)
        ):
            return NEEDS_STORE
        clock = self._judge(poll, state, now)
        if with_clock(state, clock) is not None:
            return NEEDS_STORE
        raw_retry_after = header_value(poll.upstream_headers, b"retry-after")
        retry_after = raw_retry_after.decode("latin-1") if raw_retry_after else None
        decision = decide(state, job.limits, now, retry_after, clock)
        if type(decision) is not Pass or decision.record is not None:
            return NEEDS_STORE
        poll = poll._replace(clock=clock)
        if job.shadow:
            self._log(poll, _PASS, decision)
            return None
        return self._answer(poll, decision)

    def _judge(self, poll: GuardedPoll, state: JobState, now: float) -> ClockReading:
        """The clock that decides `poll` for the record `state` (a job with hints)."""
        job = poll.target.job
        rules = job.clock_rules
        assert rules is not None  # only called for jobs with hints
        reading = backend_clock(poll.hints, rules, now, reprepared_at(state))
        if reading.ignored_future:
            self._log_skew(poll, reading)
        return judge_clock(reading, state, job.limits, now)

    def _log_skew(self, poll: GuardedPoll, reading: ClockReading) -> None:
        """Once per key (SKEW_LOG_KEYS): a backend time ignored as too far in the future."""
        job, key = poll.target.job.name, poll.target.match.key
        if (job, key) in self._skew_logged:
            return
        if len(self._skew_logged) >= SKEW_LOG_KEYS:
            self._skew_logged.clear()
        self._skew_logged.add((job, key))
        logger.warning(
            "backend time ignored job=%s key=%s fields=%s: more than hints.max_skew in the "
            "future (clock skew?); the observed clock applies (request_id=%s)",
            job,
            log_safe(key),
            ",".join(reading.ignored_future),
            log_safe(poll.request_id),
        )

    async def _probed(self, poll: GuardedPoll) -> GuardedPoll:
        """`poll` with the probe's reading as its hints when the probe answered; as it was when
        throttled or failed (its detail logged)."""
        job, match = poll.target.job, poll.target.match
        assert self._prober is not None and job.probe is not None and job.hints is not None
        result = await self._prober.probe(
            job.probe,
            job.hints,
            job=job.name,
            key=match.key,
            params=match.params,
            client_headers=poll.client_headers,
            request_id=poll.request_id.decode("latin-1"),
        )
        if result.reading is None:
            if result.detail != "throttled" and logger.isEnabledFor(logging.INFO):
                logger.info(
                    "probe gave no reading job=%s key=%s request_id=%s: %s",
                    job.name,
                    log_safe(match.key),
                    log_safe(poll.request_id),
                    log_safe(result.detail),
                )
            return poll
        return poll._replace(hints=result.reading)

    def _not_pending(self, job: GuardedJob, key: str, status: int) -> None:
        if ends_episode(status, job.end_status):
            # Off the response path: a player's Range requests on a ready file each end the
            # episode, and none of them should wait for a Redis DEL.
            task = asyncio.ensure_future(self._forget(job, key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def review(self, poll: GuardedPoll) -> GuardAnswer | None:
        """What to answer instead of the upstream's response, or None to pass it through:
        without I/O where `review_at_once` can decide, else from the shared record."""
        answer = self.review_at_once(poll)
        if answer is not NEEDS_STORE:
            return answer
        return await self.review_shared(poll)

    async def review_shared(self, poll: GuardedPoll) -> GuardAnswer | None:
        """`review` for a pending answer `review_at_once` left to the shared record (it said
        NEEDS_STORE): read it, decide, re-prepare if that is the verdict."""
        target = poll.target
        job, key = target.job, target.match.key
        if (
            job.probe is not None
            and self._prober is not None
            and poll.hints.status.value is None
            and job.clock_rules is not None
        ):
            poll = await self._probed(poll)  # bounded by probe.timeout
        now = self._clock()
        raw_retry_after = header_value(poll.upstream_headers, b"retry-after")
        retry_after = raw_retry_after.decode("latin-1") if raw_retry_after else None
        try:
            state = await self.store.observe(job.name, key, now, job.record_ttl)
        except StoreUnavailable as exc:
            return self._store_failed(poll, exc)
        if self._recent is not None:
            self._remember(job, key, state, now)
        clock = OBSERVED
        if job.clock_rules is not None:
            clock = self._judge(poll, state, now)
            poll = poll._replace(clock=clock)
        decision = decide(state, job.limits, now, retry_after, clock)
        if job.shadow:
            await self._shadow(poll, state, decision, now)
            return None
        if type(decision) is Reprepare:
            return await self._lock_and_reprepare(poll, state, decision)
        record = _record_to_write(state, decision, clock, job.clock_rules is not None)
        if record is not None:
            # An episode's first terminal verdict, a new episode after a cool-down, or the
            # backend's clock changed: one compare-and-set. Losing it is fine (another request
            # or replica wrote first), and so is a store failure (the next poll decides the
            # same and writes it).
            await self._store_record(job, key, state, record, now)
        # Every other verdict is answered without I/O, so without another coroutine.
        return self._answer(poll, decision)

    async def _store_record(
        self, job: GuardedJob, key: str, state: JobState, record: JobState, now: float
    ) -> None:
        """Swap `record` in for the observed `state`, remembering what came of it."""
        try:
            stored = await self.store.swap(job.name, key, state.version, record, job.record_ttl)
        except StoreUnavailable as exc:
            self._log_store_error(exc)
            return
        self._remember(job, key, stored, now)

    async def _lock_and_reprepare(
        self, poll: GuardedPoll, state: JobState, decision: Reprepare
    ) -> GuardAnswer | None:
        job, key = poll.target.job, poll.target.match.key
        try:
            locked = await self.store.swap(
                job.name, key, state.version, decision.locked_state, job.record_ttl
            )
        except StoreUnavailable as exc:
            return self._store_failed(poll, exc)
        if locked is None:
            # Another request or replica changed the record first: it is re-preparing.
            self._log(poll, "reprepare-in-flight", decision)
            return answers.pending(
                poll.status, poll.upstream_headers, job.limits.retry_after_reprepared
            )
        return await self._reprepare(poll, locked, decision)

    def _answer(self, poll: GuardedPoll, decision: Answered) -> GuardAnswer:
        """The answer to any verdict but REPREPARE (enforce mode)."""
        job = poll.target.job
        verdict = decision.verdict
        # str(): a StrEnum's value, without the Python-level `.value` property (~1k instructions).
        self._log(poll, str(verdict), decision)
        if type(decision) is Pass or type(decision) is InFlight:
            return answers.pending(poll.status, poll.upstream_headers, decision.retry_after)
        if verdict is Verdict.JOB_STUCK:
            detail = (
                f"pending for {decision.pending_seconds:.0f}s; {decision.attempts} re-prepare(s) "
                f"made within {job.limits.reprepare_window:g}s and the job is still not ready"
            )
        elif verdict is Verdict.WAIT_EXCEEDED:
            detail = (
                f"pending for {decision.pending_seconds:.0f}s, longer than the "
                f"{job.limits.max_wait:g}s this job may take"
            )
        else:  # REPREPARE_FAILED: within the cool-down a failed re-prepare started
            detail = "a forced re-prepare of this key failed"
        retry_after = decision.retry_after
        detail += self._cooldown_text(retry_after)
        return self._problem(poll, str(verdict), detail, decision, retry_after)

    def _cooldown_text(self, retry_after: int | None) -> str:
        """What a terminal answer's detail adds about when the key may try again."""
        if retry_after is None:
            return ""
        try:
            until = rfc3339(self._clock() + retry_after)
        except (OverflowError, OSError, ValueError):  # a clock no datetime holds
            return f"; this key gets this answer for {retry_after}s, then may try again"
        return f"; this key gets this answer until {until} ({retry_after}s), then may try again"

    async def _reprepare(
        self, poll: GuardedPoll, locked: JobState, decision: Reprepare
    ) -> GuardAnswer:
        job, key = poll.target.job, poll.target.match.key
        request_id = poll.request_id
        # Its own task: the re-prepare acts for every poller of the key, so the client that
        # happened to trigger it leaving (its request is then cancelled) must not cut it short
        # and spend an attempt on nothing. Shutdown waits for it in settled().
        work = asyncio.ensure_future(
            self._fire_and_release(poll.target, locked, poll.client_headers, request_id)
        )
        self._background.add(work)
        work.add_done_callback(self._background.discard)
        result = await asyncio.shield(work)
        REPREPARES.labels(job.name, "succeeded" if result.succeeded else "failed").inc()
        if not result.succeeded:
            if logger.isEnabledFor(logging.WARNING):
                logger.warning(
                    "re-prepare failed job=%s key=%s request_id=%s: %s",
                    job.name,
                    log_safe(key),
                    log_safe(request_id),
                    log_safe(result.detail),
                )
            self._log(poll, "reprepare-failed", decision)
            # _fire_and_release recorded the failure: the key's terminal cool-down starts now.
            retry_after = cooldown_retry_after(job.limits.terminal_cooldown)
            return self._problem(
                poll,
                "reprepare-failed",
                result.detail + self._cooldown_text(retry_after),
                decision,
                retry_after,
            )
        self._log(poll, "reprepared", decision)
        # decide() already clamped retry_after_reprepared to retry_after_max and max_wait.
        return answers.reprepared(
            poll.upstream_headers,
            locked.attempts,
            job.limits.max_reprepares,
            decision.retry_after,
            request_id,
        )

    @property
    def jobs(self) -> Mapping[str, GuardedJob]:
        """The jobs guarded now (a config reload may swap them)."""
        return self._rules.jobs

    def forget_local(self, job: str, key: str) -> None:
        """Drop what this replica remembers of (job, key) (after an admin reset)."""
        if self._recent is not None:
            self._recent.drop(job, key)

    async def force_reprepare(
        self,
        job_name: str,
        key: str,
        params: Mapping[str, str],
        client_headers: Sequence[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> ForcedOutcome:
        """Fire `job_name`'s re-prepare for `key` now (admin API): observe the record (an episode
        starts if there is none), take the lock through the same compare-and-set `swap` with the
        attempt counted against max_reprepares, fire and release as a poll's re-prepare does.
        StoreUnavailable propagates."""
        from proxy.episodes import ForceVerdict, force_lock  # admin-only: off the import path

        job = self._rules.jobs[job_name]
        ttl = job.record_ttl
        now = self._clock()
        self.forget_local(job.name, key)
        state = await self.store.observe(job.name, key, now, ttl)
        forced = force_lock(state, job.limits, now)
        if forced.locked_state is None:
            detail = (
                "a re-prepare of this key is in flight; wait for it to end"
                if forced.verdict is ForceVerdict.IN_FLIGHT
                else f"{forced.attempts} re-prepare(s) already made within "
                f"{job.limits.reprepare_window:g}s (max_reprepares); reset the episode first "
                "with DELETE, then re-prepare"
            )
            return ForcedOutcome(str(forced.verdict), detail, forced.attempts, state)
        locked = await self.store.swap(job.name, key, state.version, forced.locked_state, ttl)
        if locked is None:
            return ForcedOutcome(
                str(ForceVerdict.IN_FLIGHT),
                "another request or replica changed the record first (it is re-preparing)",
                forced.attempts,
                state,
            )
        target = GuardTarget(job, RouteMatch(job.name, key, params))
        work = asyncio.ensure_future(
            self._fire_and_release(target, locked, client_headers, request_id, forced=True)
        )
        self._background.add(work)
        work.add_done_callback(self._background.discard)
        result = await asyncio.shield(work)
        REPREPARES.labels(job.name, "succeeded" if result.succeeded else "failed").inc()
        outcome = "succeeded" if result.succeeded else "failed"
        return ForcedOutcome(outcome, result.detail, locked.attempts, state)

    async def sweep_reprepare(
        self,
        job_name: str,
        key: str,
        params: Mapping[str, str],
        state: JobState,
        locked_state: JobState,
        headers: Mapping[str, str],
        request_id: bytes,
    ) -> ForcedOutcome:
        """The sweeper's re-prepare (proxy.sweeper) of a key decide() found stuck in `state`:
        take the lock (`locked_state`, decide()'s) through the same compare-and-set `swap` as a
        poll, fire with the same idempotency key and release. `headers` (sweep.headers) stand in
        for the client's, whose request is not there; they replace reprepare.headers of their
        name. A failure leaves the episode as it was, as an operator's does: the sweeper's
        credentials failing says little about the job, and its owner may still poll. Its
        outcome is "succeeded", "failed" or "reprepare-in-flight"; StoreUnavailable propagates."""
        job = self._rules.jobs[job_name]
        locked = await self.store.swap(job.name, key, state.version, locked_state, job.record_ttl)
        if locked is None:
            return ForcedOutcome(
                "reprepare-in-flight",
                "a poll or another replica changed the record first",
                locked_state.attempts,
                state,
            )
        fixed = {n: v for n, v in job.reprepare.headers.items() if n.lower() not in headers}
        reprepare = replace(job.reprepare, headers={**fixed, **headers})
        target = GuardTarget(replace(job, reprepare=reprepare), RouteMatch(job.name, key, params))
        work = asyncio.ensure_future(
            self._fire_and_release(target, locked, (), request_id, forced=True)
        )
        self._background.add(work)
        work.add_done_callback(self._background.discard)
        result = await asyncio.shield(work)
        outcome = "succeeded" if result.succeeded else "failed"
        REPREPARES.labels(job.name, outcome).inc()
        return ForcedOutcome(outcome, result.detail, locked.attempts, state)

    async def _fire_and_release(
        self,
        target: GuardTarget,
        locked: JobState,
        client_headers: Sequence[tuple[bytes, bytes]],
        request_id: bytes,
        *,
        forced: bool = False,
    ) -> ReprepareResult:
        job, key = target.job, target.match.key
        result = _INTERRUPTED
        try:
            result = await self._repreparer.fire(
                job.reprepare,
                params=target.match.params,
                client_headers=client_headers,
                idempotency=idempotency_key(
                    job.name, key, locked.episode_start, locked.window_start, locked.attempts
                ),
                request_id=request_id.decode("latin-1"),
            )
        except Exception as exc:  # fire() reports its failures; this is a bug of ours
            logger.exception("re-prepare raised instead of reporting")
            result = ReprepareResult(False, f"re-prepare failed: {type(exc).__name__}")
        finally:
            # Whatever happened (cancellation at shutdown included), the lock is ours to release
            # now, not reprepare.timeout + margin later.
            await self._release(job, key, locked, result.succeeded, forced=forced)
        return result

    async def _release(
        self, job: GuardedJob, key: str, locked: JobState, succeeded: bool, *, forced: bool
    ) -> None:
        """Store the record after the re-prepare `locked` guarded: lock released, stuck clock
        restarted on success; a poll's failure makes the key terminal (reprepare-failed) for
        the cool-down, in the same swap, so its concurrent pollers get that answer too."""
        finished = after_reprepare(locked, self._clock(), succeeded, forced=forced)
        try:
            stored = await self.store.swap(job.name, key, locked.version, finished, job.record_ttl)
        except StoreUnavailable:
            return  # the lock expires on its own after reprepare.timeout + margin
        self._remember(job, key, stored, self._clock())

    async def _shadow(
        self, poll: GuardedPoll, state: JobState, decision: Decision, now: float
    ) -> None:
        job, key = poll.target.job, poll.target.match.key
        if type(decision) is Reprepare:
            # Record the re-prepare as if it had succeeded, so the decisions logged next are the
            # ones enforce mode would make, not "would re-prepare" on every poll.
            finished = after_reprepare(decision.locked_state, now, succeeded=True)
            await self._store_record(job, key, state, finished, now)
        else:
            # A terminal verdict, a new episode or the backend's clock, as enforced.
            record = _record_to_write(state, decision, poll.clock, job.clock_rules is not None)
            if record is not None:
                await self._store_record(job, key, state, record, now)
        verdict = decision.verdict
        if verdict is Verdict.PASS:
            name = "pass"
        elif verdict is Verdict.REPREPARE:
            name = "would re-prepare"
        else:
            name = f"would answer {verdict.value}"
        self._log(poll, name, decision)

    def _problem(
        self,
        poll: GuardedPoll,
        code: str,
        detail: str,
        decision: Decision,
        retry_after: int | None,
    ) -> GuardAnswer:
        target = poll.target
        clock = poll.clock
        context = ProblemContext(
            job=target.job.name,
            key=target.match.key,
            attempts=decision.attempts,
            max_attempts=target.job.limits.max_reprepares,
            pending_seconds=decision.pending_seconds,
            job_status=clock.job_status,
            job_age_seconds=clock.job_age,
        )
        return answers.job_problem(
            code, detail, context, poll.upstream_headers, poll.request_id, retry_after
        )

    def _log_store_error(self, exc: StoreUnavailable) -> None:
        STORE_ERRORS.inc()
        now = time.monotonic()
        if now - self._last_store_error_log >= STORE_ERROR_LOG_INTERVAL:
            self._last_store_error_log = now
            logger.warning(
                "job state store unavailable (%s); on_error=%s",
                log_safe(str(exc)),
                "fail" if self._fail_closed else "pass",
            )

    def _store_failed(self, poll: GuardedPoll, exc: StoreUnavailable) -> GuardAnswer | None:
        self._log_store_error(exc)
        if not self._fail_closed:
            return None
        job = poll.target.job
        return answers.state_unavailable(
            job.name, job.limits.retry_after, poll.upstream_headers, poll.request_id
        )

    def _remember(self, job: GuardedJob, key: str, state: JobState | None, now: float) -> None:
        if self._recent is None:
            return
        if state is None:  # lost a compare-and-set: what we knew is stale
            self._recent.drop(job.name, key)
        else:
            trust = trust_seconds(job.limits.stuck_after, job.limits.max_wait)
            self._recent.put(job.name, key, state, now + trust)

    async def _forget(self, job: GuardedJob, key: str) -> None:
        if self._recent is not None:
            self._recent.drop(job.name, key)
        try:
            await self.store.forget(job.name, key)
        except StoreUnavailable as exc:
            self._log_store_error(exc)

    def _count(self, target: GuardTarget, decision_name: str) -> None:
        series = (target.job.name, decision_name, "shadow" if target.job.shadow else "enforce")
        tally = self._decision_tallies.get(series)
        if tally is None:
            tally = self._decision_tallies[series] = DECISIONS.labels(*series)
        tally.value += 1

    def _log(self, poll: GuardedPoll, decision_name: str, decision: Decision) -> None:
        target = poll.target
        self._count(target, decision_name)
        clock = str(poll.clock.clock)
        if decision_name in _ESCALATIONS and not target.job.shadow:
            JOB_AGE.labels(target.job.name, decision_name, clock).observe(decision.pending_seconds)
        if not logger.isEnabledFor(logging.INFO):
            return
        key, rid = log_safe(target.match.key), log_safe(poll.request_id)
        logger.info(
            "decision job=%s key=%s decision=%s clock=%s pending_seconds=%.1f attempts=%d "
            "request_id=%s",
            target.job.name,
            key,
            decision_name,
            clock,
            decision.pending_seconds,
            decision.attempts,
            rid,
            # The same as fields, for logging.format: json.
            extra={
                "job": target.job.name,
                "key": key,
                "decision": decision_name,
                "clock": clock,
                "pending_seconds": round(decision.pending_seconds, 3),
                "attempts": decision.attempts,
                "request_id": rid,
            },
        )


def _record_to_write(
    state: JobState, decision: Answered, clock: ClockReading, hinted: bool
) -> JobState | None:
    """The record a verdict other than REPREPARE writes (None: nothing): the terminal mark or
    new episode it carries, holding the backend clock that decided (jobs with hints) — or the
    observed record holding it, when only the clock changed. A REPREPARE writes its lock only:
    the re-prepare clears the stored clock."""
    base = None if type(decision) is InFlight else decision.record
    if not hinted:
        return base
    changed = with_clock(state if base is None else base, clock)
    return base if changed is None else changed


def _find_target(
    rules: GuardRules, method: str, path: str, raw_path: bytes | None
) -> GuardTarget | None:
    match = rules.routes.match(method, path, raw_path)
    if match is None:
        return None
    job = rules.jobs[match.job]
    if not is_guardable_key(match.key, job.key_pattern):
        return None
    return GuardTarget(job, match)
