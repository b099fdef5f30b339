"""Several workers per host: `pollguard serve --workers 2` on one Redis, a herd of pollers on
one stuck key, real processes all the way."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx

from tests.conftest import RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ThreadedServer, running_proxy
from tests.test_guard_e2e import CALL

POLLERS = 40
POLL_SECONDS = 4.0  # stuck_after is 1 s: every poller polls past it, then gets job-stuck
MAX_POLLS = 200  # per poller, a bound should the clock misbehave


def test_forty_pollers_on_two_workers_fire_exactly_one_reprepare(
    redis_server: RedisServer,
) -> None:
    """40 concurrent pollers, spread over both workers, on one key stuck for good: the backend
    sees exactly one re-prepare (the budget is one), every poller ends on job-stuck, and one
    scrape counts every poll of both workers."""
    jobs = JobBackend(behaviour={CALL: "never"})
    with ThreadedServer(jobs.app()) as upstream:
        config = guard_config(
            upstream.url,
            redis_url=redis_server.url,
            max_reprepares=1,
            reprepare_window="10m",
            max_wait="1m",
        )
        config["server"] = {"workers": 2}
        config["logging"] = {"format": "json", "access": True, "access_buffer": 0}
        statuses: Counter[int] = Counter()
        last: dict[int, int] = {}
        lock = threading.Lock()

        with running_proxy(config) as proxy:

            def poller(index: int) -> None:
                deadline = time.monotonic() + POLL_SECONDS
                for _ in range(MAX_POLLS):
                    if time.monotonic() > deadline:
                        break
                    # A connection per poll: the kernel hands each to either worker.
                    with httpx.Client(timeout=10) as client:
                        status = client.get(f"{proxy.url}/api/recordings/file/{CALL}").status_code
                    with lock:
                        statuses[status] += 1
                        last[index] = status
                    time.sleep(0.05)  # a poll interval, as a player's Retry-After loop has

            threads = [threading.Thread(target=poller, args=(i,)) for i in range(POLLERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=POLL_SECONDS + 30)
            assert not any(thread.is_alive() for thread in threads)
            polls = sum(statuses.values())

            def guarded_counted() -> float:
                exposition = httpx.get(f"{proxy.url}/-/metrics", timeout=5).text
                return sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in exposition.splitlines()
                    if line.startswith('pollguard_requests_total{code="')
                    and 'kind="guarded"' in line
                )

            # The other worker's figures reach the shared files within a second.
            wait_until(lambda: guarded_counted() == polls, 10, f"a scrape counting {polls} polls")
            pids = {
                json.loads(line)["pid"]
                for line in proxy.logs().splitlines()
                if '"pollguard.access"' in line and f"/file/{CALL}" in line
            }
    assert jobs.prepares[CALL] == 1
    assert len(pids) == 2, "the polls all reached one worker"
    assert set(statuses) <= {202, 500}, statuses
    assert set(last.values()) == {500}, "every poller ends on the terminal answer"
