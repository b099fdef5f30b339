"""Failover end to end: two real pollguard replicas (`pollguard serve` processes) in
`state.redis_mode: cluster` (resp. `sentinel`) in front of one real job upstream whose jobs stay
pending for good, 40 pollers alternating between the replicas; one Redis master is SIGKILLed
while re-prepares are in flight. Each test has its own deployment (module-scoped: a killed node
is not given back).

Replica 0 runs `on_error: pass` (during the outage: the upstream's own 202, unguarded), replica 1
`on_error: fail` (a `503 state-unavailable` problem with Retry-After: a 5xx that explains
itself), both on one shared state, so one failover shows both answers.

Asserted, per topology:
- every answer is a 202, or a problem document of pollguard's whose `type`, `code` and status
  agree: `job-stuck`, `wait-exceeded` (500), `state-unavailable` (503); no other status, no
  transport error;
- guarded answers (`Cache-Control: no-store`: the upstream never sends it) resume on each
  replica within the failover time (kill → the replica promoted, as the topology tells
  clients) + `state.breaker_cooldown` + SLACK;
- no record is lost (each key's episode goes on across the failover), and per key the upstream
  counts at most `max_reprepares` re-prepares, or one more for a key of the killed master (why:
  `test_cluster_failover_end_to_end`).

The measured figures are printed (pytest -s) and quoted in the README's "Scaling out"."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.stores.base import JobState
from proxy.stores.redis import RedisJobStore, record_key
from proxy.stores.redis_topology import RedisTopology
from tests.conftest import SLOW_FACTOR
from tests.job_upstream import JobBackend, guard_config
from tests.redis_topologies import (
    DOWN_AFTER_MS,
    SENTINEL_SERVICE,
    RedisClusterDeployment,
    RedisNode,
    SentinelDeployment,
    redis_cli,
    start_cluster,
    start_sentinel,
)
from tests.servers import ThreadedServer, running_proxy

JOB = "recording"
POLLERS = 40
KEYS_PER_MASTER = 4  # 12 keys, 3-4 pollers on each: contention on every key, on every master
BUDGET = 2  # max_reprepares, within a reprepare_window longer than the test
STUCK_AFTER = 1.0
REPREPARE_TIMEOUT = 1.0  # a lock whose release the outage swallowed expires 5 s after this
TIMEOUT = 0.25
COOLDOWN = 2.0
POLL_INTERVAL = 0.1
MAX_POLLS = 1000  # per poller, a bound should the clock misbehave (a run makes ~100)
RETRY_AFTER_MAX = 5  # guard_config's retry_after_max
CHECK_INTERVAL = 0.05
PROMOTION_CHECK = 0.01
# Failure detection (1 s) + election and promotion, with room to spare on 2 shared cores.
FAILOVER_BOUND = 15.0 * SLOW_FACTOR
# Guarded answers come back at most one breaker_cooldown after the promotion (the breaker's
# next probe), plus: that probe's deadline, the cluster map or master address fetched anew,
# the next poll on the replica, and scheduling on 2 shared cores.
SLACK = (TIMEOUT + POLL_INTERVAL + 0.65) * SLOW_FACTOR
# Once answers are guarded again: a swallowed lock expires (reprepare timeout + 5 s after the
# kill), the rest of the budget is used (a stuck_after each), then job-stuck.
SETTLE_BOUND = (REPREPARE_TIMEOUT + 5.0 + STUCK_AFTER * (BUDGET + 1) + 5.0) * SLOW_FACTOR
FIRST_REPREPARES_BOUND = 20.0 * SLOW_FACTOR
GUARDED = frozenset({"guarded", "job-stuck", "wait-exceeded"})
UNGUARDED = frozenset({"unguarded", "state-unavailable"})
TERMINAL = frozenset({"job-stuck", "wait-exceeded"})
EXPLAINED_PROBLEMS = {"job-stuck": 500, "wait-exceeded": 500, "state-unavailable": 503}


@pytest.fixture(scope="module")
def cluster_deployment() -> Iterator[RedisClusterDeployment]:
    deployment = start_cluster(DOWN_AFTER_MS)
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    deployment = start_sentinel(DOWN_AFTER_MS)
    try:
        yield deployment
    finally:
        deployment.stop()


def classify(response: httpx.Response) -> str:
    """What kind of answer: `guarded` (pollguard's 202: no-store, a Retry-After within
    retry_after_max), `unguarded` (the upstream's own 202), the code of a problem that explains
    itself, or `unexplained`."""
    if response.status_code == 202:
        if response.headers.get("cache-control") != "no-store":
            return "unguarded"
        retry_after = response.headers.get("retry-after", "")
        honest = retry_after.isdigit() and 1 <= int(retry_after) <= RETRY_AFTER_MAX
        return "guarded" if honest else "unexplained"
    if response.headers.get("content-type") != "application/problem+json":
        return "unexplained"
    try:
        problem = response.json()
    except ValueError:
        return "unexplained"
    code = problem.get("code")
    if (
        EXPLAINED_PROBLEMS.get(code) == response.status_code == problem.get("status")
        and problem.get("type") == f"urn:pollguard:problem:{code}"
        and (code != "state-unavailable" or int(response.headers.get("retry-after", "0")) >= 1)
    ):
        return str(code)
    return "unexplained"


@dataclass(frozen=True, slots=True)
class Answer:
    replica: int
    key: str
    started: float
    ended: float
    status: int  # 0: no answer (transport error)
    kind: str


@dataclass
class Herd:
    """POLLERS pollers over `keys`, each alternating between the replicas; every answer kept."""

    urls: list[str]
    keys: list[str]
    answers: list[Answer] = field(default_factory=list)
    running: bool = True

    async def poller(self, index: int, client: httpx.AsyncClient, deadline: float) -> None:
        key = self.keys[index % len(self.keys)]
        replica = index % 2
        for _ in range(MAX_POLLS):
            if not self.running or time.monotonic() > deadline:
                return
            replica = 1 - replica
            started = time.monotonic()
            try:
                response = await client.get(f"{self.urls[replica]}/api/recordings/file/{key}")
                status, kind = response.status_code, classify(response)
            except httpx.HTTPError as exc:
                status, kind = 0, f"error {type(exc).__name__}"
            self.answers.append(Answer(replica, key, started, time.monotonic(), status, kind))
            await asyncio.sleep(POLL_INTERVAL)

    def all_terminal(self) -> bool:
        """Every key's last answer from each replica is a terminal problem: every loop ended."""
        last = {(answer.replica, answer.key): answer.kind for answer in self.answers}
        return len(last) == 2 * len(self.keys) and set(last.values()) <= TERMINAL

    def resumed_at(self, replica: int, after: float) -> float | None:
        """When `replica` answered guarded again for good after `after` (`after` itself when it
        never stopped; None: not yet)."""
        mine = [answer for answer in self.answers if answer.replica == replica]
        last_bad = max(
            (a.ended for a in mine if a.ended > after and a.kind in UNGUARDED), default=None
        )
        if last_bad is None:
            return after
        later = [a.ended for a in mine if a.ended > last_bad and a.kind in GUARDED]
        return min(later) if later else None


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], within: float, what: str
) -> float:
    """Poll `condition` every CHECK_INTERVAL until it holds; when it did (monotonic)."""
    deadline = time.monotonic() + within
    while True:
        outcome = condition()
        if outcome if isinstance(outcome, bool) else await outcome:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(CHECK_INTERVAL)


def when_true(condition: Callable[[], bool], within: float, what: str) -> float:
    """When the blocking `condition` first held (monotonic), polled every PROMOTION_CHECK in a
    thread of its own (asyncio.to_thread): the moment is not late by a turn among the pollers
    on the event loop."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        time.sleep(PROMOTION_CHECK)
    return time.monotonic()


def reply(client: SyncRedis, *command: str) -> Any:
    """`command`'s reply, or None when the node does not answer."""
    try:
        return client.execute_command(*command)
    except (RedisError, OSError):
        return None


async def read_records(store: RedisJobStore, keys: list[str]) -> dict[str, JobState]:
    """Every key's record, once each exists and the store answers (its client may still be
    mapping the cluster, or finding the promoted master)."""
    records: dict[str, JobState] = {}

    async def read_all() -> bool:
        try:
            for key in keys:
                if key not in records:
                    record = await store.read(JOB, key, time.time())
                    if record is None:
                        return False  # its first poll has not come yet
                    assert record.state is not None, f"unreadable record of {key}"
                    records[key] = record.state
        except StoreUnavailable:
            return False
        return True

    await wait_for(read_all, 10 * SLOW_FACTOR, "the records")
    return records


@dataclass(frozen=True)
class Scenario:
    """What a failover test needs of one topology."""

    name: str
    state: dict[str, Any]  # the replicas' state section, redis_mode and its fields
    topology: RedisTopology  # for the test's own store, which reads the records
    key_prefix: str
    victim: RedisNode
    promoted: Callable[[], bool]  # the failover is done, as clients are told (blocking)
    keys: list[str]
    victim_keys: frozenset[str]


@dataclass
class Outcome:
    killed_at: float
    promoted_at: float
    herd: Herd
    prepares: Counter[str]
    prepares_at_kill: Counter[str]
    before: dict[str, JobState]  # each key's record once its episode started, before the kill
    after: dict[str, JobState]  # and once every key got its terminal answer
    warnings: list[str] = field(default_factory=list)


def replica_config(upstream_url: str, scenario: Scenario, on_error: str) -> dict[str, Any]:
    config: dict[str, Any] = guard_config(
        upstream_url,
        stuck_after=f"{STUCK_AFTER:g}s",
        max_reprepares=BUDGET,
        reprepare_window="5m",
        max_wait="1m",
    )
    config["jobs"][JOB]["reprepare"]["timeout"] = f"{REPREPARE_TIMEOUT:g}s"
    config["state"] = {
        **scenario.state,
        "key_prefix": scenario.key_prefix,
        "on_error": on_error,
        "timeout": f"{TIMEOUT * 1000:g}ms",
        "breaker_cooldown": f"{COOLDOWN:g}s",
    }
    return config


def run_failover(scenario: Scenario) -> Outcome:
    jobs = JobBackend(behaviour=dict.fromkeys(scenario.keys, "never"))
    with ThreadedServer(jobs.app()) as upstream:
        with (
            running_proxy(replica_config(upstream.url, scenario, "pass")) as first,
            running_proxy(replica_config(upstream.url, scenario, "fail")) as second,
        ):
            outcome = asyncio.run(_poll_through_failover(scenario, jobs, [first.url, second.url]))
            # What each replica warned of (breaker opened with which error, answered again),
            # for a failed assertion to show.
            outcome.warnings = [
                f"replica {index}: {line}"
                for index, proxy in enumerate((first, second))
                for line in proxy.logs().splitlines()
                if "WARNING" in line
            ]
            return outcome


async def _poll_through_failover(scenario: Scenario, jobs: JobBackend, urls: list[str]) -> Outcome:
    """The herd polls; once the upstream has counted a first re-prepare of every key (the last
    ones still in flight: their locks were written milliseconds ago), SIGKILL the victim; poll
    on until every key got its terminal answer from both replicas."""
    keys = scenario.keys
    herd = Herd(urls, keys)
    store = RedisJobStore(None, scenario.key_prefix, timeout=1.0, topology=scenario.topology)
    deadline = time.monotonic() + FIRST_REPREPARES_BOUND + FAILOVER_BOUND + SETTLE_BOUND
    limits = httpx.Limits(max_connections=POLLERS * 2)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        pollers = [asyncio.create_task(herd.poller(i, client, deadline)) for i in range(POLLERS)]
        try:
            before = await read_records(store, keys)  # every episode started, none stuck yet
            await wait_for(
                lambda: all(jobs.prepares[key] >= 1 for key in keys),
                FIRST_REPREPARES_BOUND,
                "a first re-prepare of every key",
            )
            prepares_at_kill = Counter(jobs.prepares)
            scenario.victim.kill()
            killed_at = time.monotonic()
            promoted_at = await asyncio.to_thread(
                when_true, scenario.promoted, FAILOVER_BOUND, "the promotion"
            )
            await wait_for(herd.all_terminal, SETTLE_BOUND + FAILOVER_BOUND, "terminal answers")
            after = await read_records(store, keys)
        finally:
            herd.running = False
            await asyncio.gather(*pollers)
            await store.close()
    return Outcome(
        killed_at, promoted_at, herd, Counter(jobs.prepares), prepares_at_kill, before, after
    )


def check_and_report(scenario: Scenario, outcome: Outcome) -> None:
    herd, killed_at, keys = outcome.herd, outcome.killed_at, scenario.keys
    failover = outcome.promoted_at - killed_at
    recoveries = []
    for replica in (0, 1):
        resumed = herd.resumed_at(replica, killed_at)
        assert resumed is not None, f"replica {replica} never answered guarded again"
        recoveries.append(resumed - killed_at)
    kinds = Counter(answer.kind for answer in herd.answers)
    unexplained = [a for a in herd.answers if a.kind not in GUARDED | UNGUARDED]
    errors = Counter(a.kind for a in herd.answers if a.status >= 500)
    lost_episodes = [
        k for k in keys if outcome.after[k].episode_start != outcome.before[k].episode_start
    ]
    # A lock lost in the failover: a re-prepare went out that the record does not count.
    lost_locks = sum(max(0, outcome.prepares[k] - outcome.after[k].attempts) for k in keys)
    hit = [outcome.prepares[key] for key in keys if key in scenario.victim_keys]
    spared = [outcome.prepares[key] for key in keys if key not in scenario.victim_keys] or [0]
    after_kill = sum(outcome.prepares.values()) - sum(outcome.prepares_at_kill.values())
    print(
        f"\n{scenario.name}: {len(herd.answers)} answers {dict(kinds)}"
        f"\n  5xx: {sum(errors.values())} {dict(errors)}, unexplained: {len(unexplained)}"
        f"\n  promoted {failover:.2f}s after SIGKILL; guarded answers again after "
        f"{recoveries[0]:.2f}s (on_error pass), {recoveries[1]:.2f}s (on_error fail); "
        f"bound {failover + COOLDOWN + SLACK:.2f}s"
        f"\n  re-prepares per key (budget {BUDGET}): killed master's keys {min(hit)}-{max(hit)}, "
        f"other keys {min(spared)}-{max(spared)}; {after_kill} of them after the kill; "
        f"records lost {len(lost_episodes)}, locks lost {lost_locks}"
    )
    assert not unexplained, unexplained[:5]
    assert failover <= FAILOVER_BOUND
    for recovery in recoveries:
        assert recovery <= failover + COOLDOWN + SLACK, "\n".join(outcome.warnings)
    assert not lost_episodes, "records lost in the failover (a replica not in sync?)"
    assert all(count <= BUDGET + 1 for count in hit), outcome.prepares
    assert all(count <= BUDGET for count in spared), outcome.prepares
    assert after_kill > 0, "no re-prepare after the failover"


def test_cluster_failover_end_to_end(cluster_deployment: RedisClusterDeployment) -> None:
    """SIGKILL one of three masters under 40 pollers on keys of every master.

    The re-prepare bound. Redis replicates asynchronously: a write the killed master
    acknowledged but had not yet sent its replica is gone once the replica takes over. The one
    that matters is a re-prepare's lock, where the attempt is counted: the re-prepare went out,
    the promoted replica shows the attempt not taken, and the key may be re-prepared once more
    than max_reprepares. Once per failover at most: what is lost is the last instant of writes
    (the replication lag), and two locks on one key are at least stuck_after apart (the second
    needs the first released, which restarts the stuck clock, or expired). So a key of the
    killed master gets ≤ budget + 1; keys of the other masters lose nothing: ≤ budget. A whole
    record is lost only if it was created within the lag; these are older, and all survive
    (asserted: it caught test deployments that failed over before their replicas' first sync).
    Measured on loopback: nothing lost, though the kill comes while locks written milliseconds
    before are in flight."""
    deployment = cluster_deployment
    prefix = f"pollguard-{uuid.uuid4().hex[:8]}:"
    by_master = asyncio.run(_keys_by_master(deployment, prefix))
    assert len(by_master) == 3
    victim_name = sorted(by_master)[0]
    victim = deployment.node(int(victim_name.rsplit(":", 1)[1]))
    keys = [key for name in sorted(by_master) for key in by_master[name][:KEYS_PER_MASTER]]
    addresses = [node.address for node in deployment.nodes]

    replica = SyncRedis(port=_replica_of(victim), socket_timeout=TIMEOUT * 2)

    def promoted() -> bool:
        role = reply(replica, "ROLE")
        return role is not None and role[0] == b"master"

    scenario = Scenario(
        name="cluster",
        state={
            "redis_mode": "cluster",
            "redis_url": f"redis://{addresses[0]}",
            "redis_nodes": addresses[1:],
        },
        topology=RedisTopology("cluster", url=deployment.url, nodes=tuple(addresses)),
        key_prefix=prefix,
        victim=victim,
        promoted=promoted,
        keys=keys,
        victim_keys=frozenset(by_master[victim_name][:KEYS_PER_MASTER]),
    )
    with replica:
        check_and_report(scenario, run_failover(scenario))


async def _keys_by_master(deployment: RedisClusterDeployment, prefix: str) -> dict[str, list[str]]:
    """Call SIDs by the master their records live on (`master host:port` → SIDs)."""
    raw = RedisCluster.from_url(deployment.url)
    await raw.initialize()
    by_master: dict[str, list[str]] = {}
    for index in range(200):
        key = f"CA{index:032x}"
        node = raw.get_node_from_key(record_key(prefix, JOB, key))
        by_master.setdefault(node.name, []).append(key)
    await raw.aclose()
    return by_master


def _replica_of(master: RedisNode) -> int:
    """The port of `master`'s replica, from the master's CLUSTER NODES."""
    lines = [line.split() for line in redis_cli(master.port, "CLUSTER", "NODES").splitlines()]
    own_id = next(fields[0] for fields in lines if "myself" in fields[2])
    address = next(fields[1] for fields in lines if fields[3] == own_id)
    return int(address.split("@")[0].rsplit(":", 1)[1])


def test_sentinel_failover_end_to_end(sentinel_deployment: SentinelDeployment) -> None:
    """SIGKILL the Sentinel-managed master under 40 pollers: every record lives on it, so each
    key may get one re-prepare more than the budget (the lost-lock bound of the cluster test);
    guarded answers resume once the sentinels name the promoted replica, plus one cooldown."""
    deployment = sentinel_deployment
    sentinels = tuple(deployment.sentinel_addresses)
    keys = [f"CA{index:032x}" for index in range(3 * KEYS_PER_MASTER)]

    clients = [
        SyncRedis(port=node.port, socket_timeout=TIMEOUT * 2) for node in deployment.sentinels
    ]

    def promoted() -> bool:
        """A sentinel names the replica (redis-py asks them in turn, skipping a master they
        judge down)."""
        for client in clients:
            named = reply(client, "SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE)
            if named is not None and int(named[1]) == deployment.replica.port:
                return True
        return False

    scenario = Scenario(
        name="sentinel",
        state={
            "redis_mode": "sentinel",
            "sentinels": list(sentinels),
            "sentinel_service": SENTINEL_SERVICE,
        },
        topology=RedisTopology("sentinel", sentinels=sentinels, service=SENTINEL_SERVICE),
        key_prefix=f"pollguard-{uuid.uuid4().hex[:8]}:",
        victim=deployment.master,
        promoted=promoted,
        keys=keys,
        victim_keys=frozenset(keys),
    )
    try:
        check_and_report(scenario, run_failover(scenario))
    finally:
        for client in clients:
            client.close()
