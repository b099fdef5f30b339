"""`pollguard demo`: run scenarios against the simulator, through pollguard and directly, print a
timeline while they run and a summary table at the end."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from proxy.demo.away import leave_and_return
from proxy.demo.backend import DEFAULT_DOWNLOAD_SECONDS, Faults, SimulatorSettings
from proxy.demo.catalog import call_sid_for, token_for
from proxy.demo.client import (
    ClientResult,
    ClientSettings,
    Outcome,
    PollEvent,
    old_client_settings,
    play,
)
from proxy.demo.guard_config import (
    DEMO_CLOCKS,
    DEMO_LIMITS,
    DEMO_SWEEP,
    SweepTimings,
    pollguard_config,
    scaled,
    scaled_clocks,
    scaled_sweep,
)
from proxy.demo.live import LiveOutcome, LiveResult, follow
from proxy.demo.scenarios import SCENARIOS, ClientKind, Path, Scenario
from proxy.demo.servers import PollguardProcess, ServerStartError, ThreadedServer
from proxy.demo.simulator import create_simulator
from proxy.demo.verdicts import Verdict, exchanges_text, judge, judge_live, outcome_text
from proxy.policy import GuardLimits

DEMO_TENANT = "alice"
DEMO_BACKEND_RETRY_AFTER_SECONDS = 1  # the legacy 2s, compressed like the guard's timings
DEMO_CLIENT_MAX_POLLS = 15
DEMO_OLD_CLIENT_DELAY_SECONDS = 0.5
DEMO_OLD_CLIENT_MAX_POLLS = 30
# Away longer than the sweeper may take, the user comes back anyway (and finds it still stuck).
AWAY_SLACK_SECONDS = 1.0


@dataclass(frozen=True)
class DemoOptions:
    scenarios: tuple[str, ...]
    paths: tuple[Path, ...]
    speed: float = 1.0
    old_client: bool = False

    @property
    def timings(self) -> GuardLimits:
        return scaled(DEMO_LIMITS, self.speed)

    @property
    def sweep(self) -> SweepTimings:
        return scaled_sweep(DEMO_SWEEP, self.timings, self.speed)

    def config(self, scenario: Scenario, upstream_url: str) -> dict[str, Any]:
        """The pollguard config of `scenario`'s run: the sweeper and the backend's clocks only
        where the scenario is about them. The simulator knows tenant tokens only: the sweeper
        authenticates as the demo's tenant, where a deployment would use a service token."""
        return pollguard_config(
            upstream_url,
            self.timings,
            sweep=self.sweep if scenario.sweeps else None,
            sweep_headers={"Authorization": f"Bearer {token_for(DEMO_TENANT)}"},
            clocks=scaled_clocks(DEMO_CLOCKS, self.speed) if scenario.hints else None,
        )

    def away_at_most(self) -> float:
        """How long the sweeper may take after the last poll, and the fresh job after it."""
        sweep, timings = self.sweep, self.timings
        download = DEFAULT_DOWNLOAD_SECONDS / self.speed
        return (
            max(sweep.idle_after, timings.stuck_after)
            + sweep.interval
            + download
            + (AWAY_SLACK_SECONDS)
        )

    def client_settings(self) -> ClientSettings:
        if self.old_client:
            return old_client_settings(
                DEMO_OLD_CLIENT_DELAY_SECONDS / self.speed, DEMO_OLD_CLIENT_MAX_POLLS
            )
        return ClientSettings(poll_method="GET", max_polls=DEMO_CLIENT_MAX_POLLS)


@dataclass(frozen=True)
class RunReport:
    scenario: Scenario
    path: Path
    result: ClientResult | LiveResult
    jobs_created: int
    forced_prepares: int
    verdict: Verdict


@dataclass
class Timeline:
    """Prints one line per event from any thread, stamped with time since the demo began."""

    out: TextIO
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _clients_started: bool = False

    def line(self, label: str, text: str) -> None:
        with self._lock:
            print(
                f"{time.monotonic() - self.started:6.2f}s  {label:<26} {text}",
                file=self.out,
                flush=True,
            )

    def start_clock_once(self) -> None:
        """Zero the clock when the first client starts; later calls change nothing."""
        with self._lock:
            if not self._clients_started:
                self._clients_started = True
                self.started = time.monotonic()

    def client_event(self, label: str, event: PollEvent) -> None:
        retry_after = f"Retry-After: {event.retry_after}" if event.retry_after else ""
        status = event.status if event.status is not None else "---"
        self.line(label, f"{event.method:<4} -> {status} {retry_after:<15} {event.note}")


async def run_one(
    scenario: Scenario,
    path: Path,
    options: DemoOptions,
    timeline: Timeline,
    all_started: asyncio.Barrier,
) -> RunReport:
    """One scenario on one path, with its own simulator (and pollguard), cleaned up always.
    Clients start together once every run's servers are up, so timelines line up."""
    label = f"{scenario.name} / {path}"
    settings = SimulatorSettings(
        faults=Faults(worker_mode=scenario.worker_mode),
        download_seconds=DEFAULT_DOWNLOAD_SECONDS / options.speed,
        retry_after_seconds=DEMO_BACKEND_RETRY_AFTER_SECONDS,
        stuck_for=scenario.stuck_for,
    )
    simulator = create_simulator(settings, on_event=lambda _sid, msg: timeline.line(label, msg))
    server = ThreadedServer(simulator.app)
    guard: PollguardProcess | None = None
    try:
        try:
            await asyncio.to_thread(server.start)
            base_url = server.url
            if path is Path.POLLGUARD:
                guard = PollguardProcess(options.config(scenario, server.url))
                await asyncio.to_thread(guard.start)
                base_url = guard.url
        except BaseException:
            await all_started.abort()  # release the other runs instead of leaving them waiting
            raise
        await all_started.wait()
        timeline.start_clock_once()
        action = (
            "opens the job's status feed on"
            if scenario.client is ClientKind.WEBSOCKET
            else "starts polling"
        )
        timeline.line(label, f"client {action} {base_url} ({scenario.story})")
        call_sid = call_sid_for(DEMO_TENANT, 0)
        result: ClientResult | LiveResult
        back: ClientResult | None = None
        if scenario.client is ClientKind.RETURNING:
            visits = await leave_and_return(
                base_url,
                call_sid,
                token_for(DEMO_TENANT),
                options.client_settings(),
                ready=lambda: call_sid in simulator.backend.snapshot()["ready"],
                away_at_most=options.away_at_most(),
                on_event=lambda event: timeline.client_event(label, event),
                on_note=lambda text: timeline.line(label, text),
            )
            result, back = visits.joined, visits.back
        elif scenario.client is ClientKind.WEBSOCKET:
            result = await follow(
                base_url,
                call_sid,
                token_for(DEMO_TENANT),
                on_event=lambda text: timeline.line(label, text),
            )
        else:
            result = await play(
                base_url,
                call_sid,
                token_for(DEMO_TENANT),
                options.client_settings(),
                on_event=lambda event: timeline.client_event(label, event),
            )
        counters = simulator.backend.snapshot()
        jobs = int(counters["jobs_created"].get(call_sid, 0))
        forced = int(counters["forced_prepares"].get(call_sid, 0))
        verdict = (
            judge_live(result, jobs)
            if isinstance(result, LiveResult)
            else judge(scenario, path, result, jobs, options.timings, back)
        )
        timeline.line(
            label,
            f"=> {outcome_text(result)}: {'as promised' if verdict.ok else 'NOT as promised'}",
        )
        return RunReport(scenario, path, result, jobs, forced, verdict)
    finally:
        if guard is not None:
            await asyncio.to_thread(guard.close)
        await asyncio.to_thread(server.stop)


def format_summary(reports: list[RunReport]) -> str:
    header = (
        "scenario",
        "path",
        "outcome",
        "polls/msgs",
        "jobs",
        "re-prepares",
        "time",
        "expected",
        "ok",
    )
    rows = [header] + [
        (
            r.scenario.name,
            str(r.path),
            outcome_text(r.result),
            exchanges_text(r.result),
            str(r.jobs_created),
            str(r.forced_prepares),
            f"{r.result.elapsed:.1f}s",
            r.verdict.expected,
            "yes" if r.verdict.ok else "NO",
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


async def _run_all(options: DemoOptions, timeline: Timeline) -> list[RunReport | BaseException]:
    pairs = [(name, path) for name in options.scenarios for path in options.paths]
    all_started = asyncio.Barrier(len(pairs))
    runs = [run_one(SCENARIOS[name], path, options, timeline, all_started) for name, path in pairs]
    return list(await asyncio.gather(*runs, return_exceptions=True))


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when every run ended as promised, 1 otherwise."""
    timings = options.timings
    print(
        f"pollguard demo: stuck_after {timings.stuck_after:g}s, max_reprepares "
        f"{timings.max_reprepares}, retry_after_reprepared {timings.retry_after_reprepared:g}s,"
        f" max_wait {timings.max_wait:g}s (minutes compressed to seconds)",
        file=out,
    )
    if any(SCENARIOS[name].sweeps for name in options.scenarios):
        sweep = options.sweep
        print(
            f"  sweep (swept only): a pass every {sweep.interval:g}s over stuck keys unpolled "
            f"for {sweep.idle_after:g}s",
            file=out,
        )
    timeline = Timeline(out)
    outcomes = asyncio.run(_run_all(options, timeline))
    reports = [o for o in outcomes if isinstance(o, RunReport)]
    # A run released by another run's startup failure reports only that consequence; skip it.
    failures = [o for o in outcomes if not isinstance(o, RunReport | asyncio.BrokenBarrierError)]
    print("", file=out)
    if reports:
        print(format_summary(reports), file=out)
    for failure in failures:
        hint = "" if not isinstance(failure, ServerStartError) else " (could not start a server)"
        print(f"error{hint}: {failure}", file=out)
    all_ok = not failures and all(r.verdict.ok for r in reports)
    played = sum(r.result.outcome is Outcome.PLAYED for r in reports)
    followed = sum(r.result.outcome is LiveOutcome.FOLLOWED for r in reports)
    live = f"{followed} followed live, " if followed else ""
    print(
        f"\n{len(reports)} runs, {played} played, {live}"
        f"{'all as promised' if all_ok else 'SOME NOT AS PROMISED'} "
        f"({time.monotonic() - timeline.started:.1f}s)",
        file=out,
    )
    return 0 if all_ok else 1
