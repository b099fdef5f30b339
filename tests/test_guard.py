"""The job guard in-process: JobGuard on a memory store with an injected clock, its re-prepare
answered by respx (or a loopback backend), every timing decided by moving the clock, not by
waiting. The subprocess smoke tests are in test_guard_e2e.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import respx
import yaml

from proxy import guard as guard_module
from proxy.answers import GuardAnswer
from proxy.app import guard_rules
from proxy.config import parse_config
from proxy.guard import NEEDS_STORE, GuardedPoll, JobGuard
from proxy.headers import RawHeaders
from proxy.metrics import REGISTRY
from proxy.reprepare import Repreparer
from proxy.stores import MemoryJobStore
from proxy.stores.base import NO_LOCK
from tests.job_upstream import RECORDING, JobBackend, guard_config
from tests.servers import ThreadedServer

CALL = "CA" + "0" * 32
FILE = f"/api/recordings/file/{CALL}"
BASE = "http://upstream.test"  # only respx answers here
PREPARE = f"{BASE}/api/recordings/{CALL}/prepare"
CLIENT_HEADERS = [(b"authorization", b"Bearer alice"), (b"user-agent", b"player")]


class HeldBackend:
    """A loopback socket that reads a request and answers `200` only once `answer` is set;
    `requested` is set on the first request."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.answer = asyncio.Event()
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requested.set()
        await self.answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HeldBackend]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self.answer.set()
            server.close()


def decisions(name: str, mode: str = "enforce") -> float:
    labels = {"job": "recording", "decision": name, "mode": mode}
    return REGISTRY.get_sample_value("pollguard_decisions_total", labels) or 0.0


@asynccontextmanager
async def in_process_guard(
    upstream_url: str, now: list[float], *, store: MemoryJobStore | None = None, **job: object
) -> AsyncIterator[JobGuard]:
    """The guard `pollguard serve` builds from guard_config, on a memory store (a new one, or
    `store`, shared with another guard as replicas share Redis) and the clock `now[0]`."""
    config = parse_config(yaml.safe_dump(guard_config(upstream_url, **job)), env={})
    jobs, routes = guard_rules(config)
    repreparer = Repreparer(upstream_url, connect_timeout=1)
    try:
        yield JobGuard(
            jobs,
            routes,
            store if store is not None else MemoryJobStore(),
            repreparer,
            fail_closed=False,
            clock=lambda: now[0],
        )
    finally:
        await repreparer.close()


@dataclass
class Player:
    """Polls through `guard` as the forwarder does: the upstream's answer (status, headers) in,
    the guard's answer (None: the upstream's passes) out, background work settled."""

    guard: JobGuard

    async def poll(
        self, status: int = 202, headers: RawHeaders = (), request_id: bytes = b"rid"
    ) -> GuardAnswer | None:
        target = self.guard.target("GET", FILE)
        assert target is not None
        poll = GuardedPoll(target, status, list(headers), CLIENT_HEADERS, request_id)
        answer = await self.guard.review(poll)
        await self.guard.settled()
        return answer

    async def pending(self, headers: RawHeaders = ()) -> GuardAnswer:
        """A 202 poll the guard must answer (enforce mode)."""
        answer = await self.poll(202, headers)
        assert answer is not None
        return answer


def header(answer: GuardAnswer, name: bytes) -> bytes | None:
    return dict(answer.headers).get(name)


def problem(answer: GuardAnswer) -> dict[str, object]:
    assert answer.status == 500 and answer.body is not None
    assert header(answer, b"content-type") == b"application/problem+json"
    assert header(answer, b"cache-control") == b"no-store"
    document: dict[str, object] = json.loads(answer.body)
    return document


@pytest.fixture
def prepare() -> Iterator[respx.Route]:
    """The upstream's prepare endpoint, answering 200 unless a test says otherwise."""
    with respx.mock(assert_all_called=False) as mock:
        yield mock.post(url__startswith=PREPARE).respond(200)


@asynccontextmanager
async def player(now: list[float], **job: object) -> AsyncIterator[Player]:
    async with in_process_guard(BASE, now, **job) as guard:
        yield Player(guard)


@pytest.mark.anyio
async def test_stuck_once_is_reprepared_then_served(prepare: respx.Route) -> None:
    """Pending past stuck_after: one forced re-prepare (query, Idempotency-Key, request id and
    the client's Authorization sent), a 202 saying so, pending answers again; a 200 ends it."""
    now = [1000.0]
    async with player(now) as poller:
        first = await poller.pending([(b"retry-after", b"3")])
        assert (first.status, first.body, header(first, b"retry-after")) == (202, None, b"3")
        assert header(first, b"cache-control") == b"no-store"
        now[0] = 1001.0  # stuck_after 1s
        reprepared = await poller.poll(request_id=b"rid-2")
        assert prepare.call_count == 1
        assert reprepared is not None and reprepared.status == 202
        assert reprepared.body == (
            b'{"status":"processing","reprepared":true,"attempt":1,"max_attempts":2}'
        )
        assert header(reprepared, b"content-type") == b"application/json"
        assert header(reprepared, b"retry-after") == b"1"
        assert header(reprepared, b"cache-control") == b"no-store"
        sent = prepare.calls.last.request
        assert sent.url.query == b"force=1"
        assert sent.headers["idempotency-key"].startswith("pollguard-")
        assert sent.headers["x-request-id"] == "rid-2"
        assert sent.headers["authorization"] == "Bearer alice"
        now[0] = 1001.5  # the stuck clock restarted at the re-prepare
        assert (await poller.pending()).body is None
        assert await poller.poll(200) is None
        assert prepare.call_count == 1
        assert await poller.guard.store.read("recording", CALL, now[0]) is None  # episode over


@pytest.mark.anyio
async def test_never_finishing_job_ends_in_job_stuck(prepare: respx.Route) -> None:
    """Exactly max_reprepares re-prepares, one per stuck_after, then 500 job-stuck naming the
    attempts, and again at the next poll; a job that finally finishes is served at once."""
    now = [1000.0]
    stuck_before = decisions("job-stuck")
    async with player(now) as poller:
        await poller.pending()
        for attempt, at in ((1, 1001.0), (2, 1002.0)):
            now[0] = at
            answer = await poller.pending()
            assert answer.body is not None and f'"attempt":{attempt},'.encode() in answer.body
        now[0] = 1003.0
        stuck = problem(await poller.pending())
        assert stuck["type"] == "urn:pollguard:problem:job-stuck"
        assert stuck["code"] == stuck["error"] == "job-stuck"
        assert (stuck["attempts"], stuck["max_attempts"]) == (2, 2)
        assert (stuck["job"], stuck["key"], stuck["pending_seconds"]) == ("recording", CALL, 3.0)
        now[0] = 1003.5
        assert problem(await poller.pending())["code"] == "job-stuck"
        assert prepare.call_count == 2
        assert await poller.poll(200) is None
    assert decisions("job-stuck") == stuck_before + 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("side_effect", "named"),
    [
        pytest.param(httpx.Response(500), "upstream answered 500", id="answered-500"),
        pytest.param(httpx.ConnectError("refused"), "ConnectError", id="unreachable"),
    ],
)
async def test_failing_prepare_answers_reprepare_failed(
    prepare: respx.Route, side_effect: httpx.Response | Exception, named: str
) -> None:
    """A re-prepare that fails ends the loop at once with 500 reprepare-failed naming why,
    and the key's cool-down (Retry-After 120 by default) without another re-prepare."""
    prepare.side_effect = side_effect
    now = [1000.0]
    async with player(now) as poller:
        await poller.pending()
        now[0] = 1001.0
        failed = await poller.pending()
        document = problem(failed)
        assert document["code"] == "reprepare-failed" and named in str(document["detail"])
        assert header(failed, b"retry-after") == b"120"
        now[0] = 1002.0
        assert problem(await poller.pending())["code"] == "reprepare-failed"
    assert prepare.call_count == 1


@pytest.mark.anyio
async def test_max_wait_answers_wait_exceeded(prepare: respx.Route) -> None:
    """Pending past max_wait (shorter than stuck_after): 500 wait-exceeded, no re-prepare, and
    no Retry-After before it promises a retry past the deadline."""
    now = [1000.0]
    async with player(now, stuck_after="30s", max_wait="1500ms") as poller:
        retry_afters = []
        for at in (1000.0, 1000.5, 1001.0):
            now[0] = at
            answer = await poller.pending([(b"retry-after", b"5")])
            assert answer.status == 202
            retry_afters.append(header(answer, b"retry-after"))
        assert retry_afters == [b"1", b"1", b"1"]
        now[0] = 1001.5
        exceeded = problem(await poller.pending())
    assert exceeded["code"] == "wait-exceeded" and exceeded["pending_seconds"] == 1.5
    assert prepare.call_count == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("upstream", "sent"),
    [
        pytest.param(b"3600", b"5", id="capped-at-retry-after-max"),
        pytest.param(None, b"1", id="missing-gets-retry-after"),
        pytest.param(b"soon", b"1", id="invalid-gets-retry-after"),
        pytest.param(b"3", b"3", id="within-bounds-kept"),
    ],
)
async def test_upstream_retry_after_is_capped_and_defaulted(
    upstream: bytes | None, sent: bytes
) -> None:
    """An upstream Retry-After above retry_after_max is capped; a missing or invalid one gets
    retry_after; the upstream's body is kept (the answer replaces only the head)."""
    now = [1000.0]
    headers = [] if upstream is None else [(b"retry-after", upstream)]
    async with player(now, stuck_after="30s", max_wait="60s") as poller:
        answer = await poller.pending(headers)
    assert (answer.status, answer.body, header(answer, b"retry-after")) == (202, None, sent)
    assert [name for name, _ in answer.headers].count(b"retry-after") == 1


@pytest.mark.anyio
async def test_cors_answers_expose_retry_after(prepare: respx.Route) -> None:
    """With Access-Control-Allow-Origin from the upstream, every answer (pending, re-prepared,
    terminal) keeps it and exposes Retry-After."""
    now = [1000.0]
    cors = [(b"access-control-allow-origin", b"*")]
    async with player(now, max_reprepares=1) as poller:
        answers = []
        for at in (1000.0, 1001.0, 1002.0):
            now[0] = at
            answers.append(await poller.pending(cors))
    assert [answer.status for answer in answers] == [202, 202, 500]
    for answer in answers:
        assert header(answer, b"access-control-allow-origin") == b"*"
        exposed = header(answer, b"access-control-expose-headers")
        assert exposed is not None and b"retry-after" in exposed.lower()


@pytest.mark.anyio
async def test_a_key_failing_key_pattern_is_not_guarded() -> None:
    """A key that fails key_pattern has no target: the request is forwarded unguarded."""
    async with in_process_guard(BASE, [1000.0], key_pattern="^CA[0-9a-f]{32}$") as guard:
        assert guard.target("GET", "/api/recordings/file/not-a-call") is None
        assert guard.target("GET", FILE) is not None


@pytest.mark.anyio
async def test_shadow_mode_changes_nothing_and_logs_decisions(
    prepare: respx.Route, caplog: pytest.LogCaptureFixture
) -> None:
    """Shadow mode passes every upstream answer through, fires no re-prepare, and logs what it
    would do: re-prepare when stuck, wait-exceeded past max_wait."""
    caplog.set_level(logging.INFO, logger="pollguard.guard")
    now = [1000.0]
    async with player(now, mode="shadow", max_wait="2s") as poller:
        for step in range(25):
            now[0] = 1000.0 + step * 0.1
            assert await poller.poll(202, [(b"retry-after", b"2")]) is None
    assert prepare.call_count == 0
    assert "decision=would re-prepare" in caplog.text
    assert "decision=would answer wait-exceeded" in caplog.text


@pytest.mark.anyio
async def test_two_guards_on_one_store_reprepare_once(prepare: respx.Route) -> None:
    """Two guards (replicas) on one store, 40 pollers of one stuck key at once: one re-prepare;
    while it runs the others are answered reprepare-in-flight (202, retry_after_reprepared)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return httpx.Response(200)

    prepare.side_effect = held
    now, store = [1000.0], MemoryJobStore()
    in_flight_before = decisions("reprepare-in-flight")
    async with (
        in_process_guard(BASE, now, store=store) as first,
        in_process_guard(BASE, now, store=store) as second,
    ):
        await Player(first).pending()  # the episode starts
        now[0] = 1001.0
        reviews = []
        for index in range(40):
            guard = (first, second)[index % 2]
            target = guard.target("GET", FILE)
            assert target is not None
            poll = GuardedPoll(target, 202, [], CLIENT_HEADERS, b"rid-%d" % index)
            reviews.append(asyncio.ensure_future(guard.review(poll)))
        await started.wait()
        waiting = [review for review in reviews if not review.done()]
        assert len(waiting) == 1  # the poll that re-prepares waits for it; the rest are answered
        release.set()
        answers = await asyncio.gather(*reviews)
        await first.settled()
        await second.settled()
        record = await store.read("recording", CALL, now[0])
    assert prepare.call_count == 1
    assert all(answer is not None and answer.status == 202 for answer in answers)
    assert sum(answer is not None and answer.body is not None for answer in answers) == 1
    assert all(
        answer is not None and dict(answer.headers)[b"retry-after"] == b"1" for answer in answers
    )
    assert decisions("reprepare-in-flight") == in_flight_before + 39
    assert record is not None and record.state is not None
    assert (record.state.attempts, record.state.lock_until) == (1, NO_LOCK)


@pytest.mark.anyio
async def test_a_client_leaving_does_not_cut_the_reprepare_short() -> None:
    """The request that triggered a re-prepare is cancelled (its client left): the re-prepare
    still completes and releases the lock with its real outcome (a success restarts the clock)."""
    now = [1000.0]
    async with HeldBackend().running() as held, in_process_guard(held.url, now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        assert (
            await guard.review(GuardedPoll(target, 202, [], [], b"rid-1")) is not None
        )  # episode starts
        now[0] += 2.0  # past stuck_after (1s)
        review = asyncio.ensure_future(guard.review(GuardedPoll(target, 202, [], [], b"rid-2")))
        await asyncio.wait_for(held.requested.wait(), timeout=5)
        review.cancel()
        with pytest.raises(asyncio.CancelledError):
            await review
        held.answer.set()
        await asyncio.wait_for(guard.settled(), timeout=5)
        state = await guard.store.observe("recording", CALL, now[0], 60)
    assert state.lock_until == NO_LOCK
    assert (state.attempts, state.clock_start) == (1, now[0])


@pytest.mark.anyio
async def test_a_reprepare_cancelled_at_shutdown_releases_its_lock() -> None:
    """A re-prepare itself cancelled in flight (the loop shutting down) releases the key's lock
    at once, its attempt counted, instead of holding it for reprepare.timeout + 5s."""
    now = [1000.0]
    async with HeldBackend().running() as held, in_process_guard(held.url, now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        assert (
            await guard.review(GuardedPoll(target, 202, [], [], b"rid-1")) is not None
        )  # episode starts
        now[0] += 2.0  # past stuck_after (1s)
        review = asyncio.ensure_future(guard.review(GuardedPoll(target, 202, [], [], b"rid-2")))
        await asyncio.wait_for(held.requested.wait(), timeout=5)
        work = [task for task in asyncio.all_tasks() if "_fire_and_release" in repr(task)]
        assert len(work) == 1
        work[0].cancel()
        with pytest.raises(asyncio.CancelledError):  # the request ends as shutdown ends it
            await review
        state = await guard.store.observe("recording", CALL, now[0], 60)
    assert state.lock_until == NO_LOCK
    assert (state.attempts, state.clock_start) == (1, 1000.0)


@pytest.mark.anyio
async def test_only_end_statuses_end_an_episode() -> None:
    """In-process: 404, 401, 403 and 500 on a guarded key leave its record alone; a 200 forgets it."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        await guard.review(GuardedPoll(target, 202, [], [], b"rid"))
        before = await guard.store.observe("recording", CALL, now[0], 60)
        for status in (404, 401, 403, 500):
            assert await guard.review(GuardedPoll(target, status, [], [], b"rid")) is None
        await guard.settled()
        kept = await guard.store.observe("recording", CALL, now[0] + 1, 60)
        assert await guard.review(GuardedPoll(target, 200, [], [], b"rid")) is None
        await guard.settled()
        fresh = await guard.store.observe("recording", CALL, now[0] + 2, 60)
    assert kept == before
    assert fresh.episode_start == now[0] + 2


@pytest.mark.anyio
async def test_review_at_once_answers_what_review_would_or_defers_to_it() -> None:
    """The no-I/O review answers a PASS (Retry-After, no-store) and a non-pending status as
    review does, and defers everything that needs the store or a re-prepare (stuck, past
    max_wait) instead of deciding it from what it holds."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        pending = [(b"retry-after", b"3")]
        passes = decisions("pass")
        at_once = guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid"))
        assert decisions("pass") == passes + 1  # counted, with or without the INFO line
        assert at_once is not NEEDS_STORE and at_once is not None
        assert at_once == await guard.review(GuardedPoll(target, 202, pending, [], b"rid"))
        assert (at_once.status, at_once.body) == (202, None)
        assert {(b"retry-after", b"3"), (b"cache-control", b"no-store")} <= set(at_once.headers)
        assert guard.review_at_once(GuardedPoll(target, 404, pending, [], b"rid")) is None
        now[0] += 2.0  # past stuck_after (1s): a re-prepare is due
        assert guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
        now[0] += 20.0  # past max_wait (10s)
        assert guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
        problem = await guard.review(GuardedPoll(target, 202, pending, [], b"rid"))
        assert problem is not None and problem.status == 500
        assert guard.review_at_once(GuardedPoll(target, 200, pending, [], b"rid")) is None
        await guard.settled()
        fresh = await guard.store.observe("recording", CALL, now[0], 60)
    assert fresh.episode_start == now[0]  # the 200 ended the episode


@pytest.mark.anyio
async def test_shadow_mode_is_decided_at_once_but_never_answers() -> None:
    """Shadow: a PASS is counted without I/O and the upstream's answer passes (None); what
    needs the record goes to review, which decides, counts and still passes everything."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now, mode="shadow") as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        passes = decisions("pass", "shadow")
        assert guard.review_at_once(GuardedPoll(target, 202, [], [], b"rid")) is None
        assert decisions("pass", "shadow") == passes + 1
        now[0] += 2.0  # past stuck_after: enforce mode would re-prepare
        assert guard.review_at_once(GuardedPoll(target, 202, [], [], b"rid")) is NEEDS_STORE
        would = decisions("would re-prepare", "shadow")
        assert await guard.review(GuardedPoll(target, 202, [], [], b"rid")) is None
        assert decisions("would re-prepare", "shadow") == would + 1


@pytest.mark.anyio
async def test_target_answers_from_its_cache_as_from_the_route_table() -> None:
    """Asked twice, target() answers the same as the first time, which is what the route table
    and key check say: the raw path is part of what is remembered (an encoded slash unguards)."""
    path = f"/api/recordings/file/{CALL}"
    requests: list[tuple[str, str, bytes | None]] = [
        ("GET", path, None),
        ("GET", path, path.encode()),
        ("HEAD", path, None),
        ("POST", path, None),
        ("GET", "/api/recordings/file/a/b", b"/api/recordings/file/a%2Fb"),
        ("GET", "/api/recordings/file/..", None),
        ("GET", "/api/other", None),
    ]
    async with in_process_guard("http://127.0.0.1:9", [1000.0]) as guard:
        first = [guard.target(*request) for request in requests]
        second = [guard.target(*request) for request in requests]
    assert second == first
    assert [None if found is None else found.match.key for found in first] == [
        CALL,
        CALL,
        CALL,
        None,
        None,
        None,
        None,
    ]


@pytest.mark.anyio
async def test_target_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many distinct paths clients send, the cache holds at most TARGET_CACHE_SIZE
    targets and none longer than TARGET_CACHE_MAX_PATH; answers stay right past the bound."""
    monkeypatch.setattr(guard_module, "TARGET_CACHE_SIZE", 8)
    async with in_process_guard("http://127.0.0.1:9", [1000.0]) as guard:
        for index in range(100):
            found = guard.target("GET", f"/api/recordings/file/CA{index}")
            assert found is not None and found.match.key == f"CA{index}"
            assert len(guard.rules.targets) <= 8
        long_path = "/api/recordings/file/" + "C" * 250  # a guardable key, a path past the limit
        assert len(long_path) > guard_module.TARGET_CACHE_MAX_PATH
        assert guard.target("GET", long_path) is not None
        assert guard.target("GET", long_path + "C" * 10) is None  # a key over 256 bytes
        for _, path, raw_path in guard.rules.targets:
            assert len(path) <= guard_module.TARGET_CACHE_MAX_PATH
            assert raw_path is None or len(raw_path) <= guard_module.TARGET_CACHE_MAX_PATH
        encoded = "/api/recordings/file/" + "%41" * 100  # 100 characters, 300 bytes raw
        assert guard.target("GET", encoded.replace("%41", "A"), encoded.encode()) is not None
        assert ("GET", encoded.replace("%41", "A"), encoded.encode()) not in guard.rules.targets
        assert guard.target("GET", "/elsewhere") is None
        assert ("GET", "/elsewhere", None) not in guard.rules.targets  # no route starts so


@dataclass
class Answer:
    status: int
    retry_after: str | None
    body: bytes


class CooldownPoller:
    """A player polling the loopback JobBackend through the in-process guard, as the proxy
    does: the backend's answer, or the guard's instead of it."""

    def __init__(self, guard: JobGuard, client: httpx.AsyncClient, backend_url: str) -> None:
        self.guard = guard
        self.client = client
        self.url = f"{backend_url}/api/recordings/file/{CALL}"
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        self.target = target

    async def poll(self) -> Answer:
        response = await self.client.get(self.url)
        headers = [(name.lower(), value) for name, value in response.headers.raw]
        answer = await self.guard.review(
            GuardedPoll(self.target, response.status_code, headers, [], b"rid")
        )
        await self.guard.settled()
        if answer is None:
            return Answer(
                response.status_code, response.headers.get("retry-after"), response.content
            )
        retry_after = dict(answer.headers).get(b"retry-after")
        body = response.content if answer.body is None else answer.body
        return Answer(answer.status, None if retry_after is None else retry_after.decode(), body)

    async def version(self) -> int:
        record = await self.guard.store.read("recording", CALL, 0.0)
        assert record is not None and record.state is not None
        return record.state.version


def problem_code(answer: Answer) -> str:
    assert answer.status == 500
    code: str = httpx.Response(500, content=answer.body).json()["code"]
    return code


@asynccontextmanager
async def cooldown_poller(
    jobs: JobBackend, now: list[float], **job: object
) -> AsyncIterator[CooldownPoller]:
    with ThreadedServer(jobs.app()) as server:
        async with (
            in_process_guard(server.url, now, **job) as guard,
            httpx.AsyncClient(timeout=5) as client,
        ):
            yield CooldownPoller(guard, client, server.url)


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_job_stuck_cooldown_then_a_new_episode(fixed: bool) -> None:
    """job-stuck, then within terminal_cooldown the same 500 with a counting-down Retry-After,
    no re-prepare and no store write; after it a fixed backend's job plays, and a still
    broken one gets a new episode with the full budget (re-prepared after stuck_after)."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    async with cooldown_poller(jobs, now, terminal_cooldown="30s") as player:
        assert (await player.poll()).status == 202  # the episode starts
        for at in (1001.0, 1002.0):  # stuck_after 1s: two re-prepares, max_reprepares 2
            now[0] = at
            assert b"reprepared" in (await player.poll()).body
        now[0] = 1003.0
        stuck = await player.poll()
        assert (problem_code(stuck), stuck.retry_after) == ("job-stuck", "30")
        detail = httpx.Response(500, content=stuck.body).json()["detail"]
        assert "until 1970-01-01T00:17:13.000Z (30s), then may try again" in detail
        marked = await player.version()
        for at, left in ((1003.5, "30"), (1004.0, "29"), (1020.5, "13"), (1032.9, "1")):
            now[0] = at
            again = await player.poll()
            assert (problem_code(again), again.retry_after) == ("job-stuck", left)
        assert jobs.prepares[CALL] == 2
        assert await player.version() == marked  # no store write per poll in the cool-down
        now[0] = 1033.0
        if fixed:
            jobs.ready.add(CALL)
            played = await player.poll()
            assert (played.status, played.body) == (200, RECORDING)
            return
        restarted = await player.poll()
        assert restarted.status == 202 and b"reprepared" not in restarted.body
        now[0] = 1033.9
        assert (await player.poll()).status == 202
        assert jobs.prepares[CALL] == 2
        now[0] = 1034.0  # stuck_after of the new episode: its first re-prepare
        assert b'"attempt":1,' in (await player.poll()).body
        assert jobs.prepares[CALL] == 3


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_wait_exceeded_cooldown_then_a_new_episode(fixed: bool) -> None:
    """wait-exceeded, repeated for the cool-down; after it the job plays once fixed, or a new
    episode gets max_wait in full again."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    job = {"stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with cooldown_poller(jobs, now, **job) as player:
        assert (await player.poll()).status == 202
        now[0] = 1002.0
        first = await player.poll()
        assert (problem_code(first), first.retry_after) == ("wait-exceeded", "10")
        now[0] = 1005.0
        again = await player.poll()
        assert (problem_code(again), again.retry_after) == ("wait-exceeded", "7")
        now[0] = 1012.0
        if fixed:
            jobs.ready.add(CALL)
            assert (await player.poll()).body == RECORDING
            return
        assert (await player.poll()).status == 202  # a new episode from 1012
        now[0] = 1013.9
        assert (await player.poll()).status == 202
        now[0] = 1014.0
        assert problem_code(await player.poll()) == "wait-exceeded"
        assert jobs.prepares[CALL] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_reprepare_failed_cooldown_then_a_new_episode(fixed: bool) -> None:
    """A failed re-prepare makes the key terminal when its lock is released: every poll of the
    cool-down gets reprepare-failed without another re-prepare; after it, a fixed job plays,
    and a still failing prepare endpoint is tried again only after a new stuck_after."""
    jobs = JobBackend(behaviour={CALL: "fail"})
    now = [1000.0]
    async with cooldown_poller(jobs, now, terminal_cooldown="20s") as player:
        assert (await player.poll()).status == 202
        now[0] = 1001.0
        failed = await player.poll()
        assert (problem_code(failed), failed.retry_after) == ("reprepare-failed", "20")
        assert "500" in httpx.Response(500, content=failed.body).json()["detail"]
        record = await player.guard.store.read("recording", CALL, now[0])
        assert record is not None and record.state is not None
        assert (record.state.terminal, record.state.terminal_at) == ("reprepare-failed", 1001.0)
        for at, left in ((1001.0, "20"), (1005.0, "16"), (1020.5, "1")):
            now[0] = at
            again = await player.poll()
            assert (problem_code(again), again.retry_after) == ("reprepare-failed", left)
        assert jobs.prepares[CALL] == 1
        now[0] = 1021.0
        if fixed:
            jobs.ready.add(CALL)
            assert (await player.poll()).body == RECORDING
            return
        assert (await player.poll()).status == 202  # a new episode from 1021
        assert jobs.prepares[CALL] == 1
        now[0] = 1022.0
        assert problem_code(await player.poll()) == "reprepare-failed"
        assert jobs.prepares[CALL] == 2


@pytest.mark.anyio
async def test_review_at_once_never_passes_a_key_in_its_cooldown() -> None:
    """The no-I/O fast path defers a terminal key to the store, within the cool-down and at its
    end (the new episode has to be written); once written, it passes at once again."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    job = {"stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with cooldown_poller(jobs, now, **job) as player:
        guard, target = player.guard, player.target
        pending = [(b"retry-after", b"1")]
        assert (
            guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is not NEEDS_STORE
        )
        now[0] = 1002.0
        assert problem_code(await player.poll()) == "wait-exceeded"
        for at in (1002.5, 1011.9, 1012.0):
            now[0] = at
            assert (
                guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
            )
        assert (await player.poll()).status == 202  # the new episode, written
        at_once = guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid"))
        assert at_once is not NEEDS_STORE and at_once is not None and at_once.status == 202


@pytest.mark.anyio
async def test_shadow_mode_records_the_cooldown_as_enforce_would() -> None:
    """Shadow: the terminal is recorded and the cool-down restarts the episode, as in enforce
    mode, so the decisions logged are the ones enforce would make; nothing is answered."""
    now = [1000.0]
    job = {"mode": "shadow", "stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with in_process_guard("http://127.0.0.1:9", now, **job) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        would = decisions("would answer wait-exceeded", "shadow")
        for at in (1000.0, 1002.0, 1005.0, 1012.0):
            now[0] = at
            assert await guard.review(GuardedPoll(target, 202, [], [], b"rid")) is None
            record = await guard.store.read("recording", CALL, at)
            assert record is not None and record.state is not None
            if at == 1005.0:
                assert (record.state.terminal, record.state.terminal_at) == (
                    "wait-exceeded",
                    1002.0,
                )
        assert decisions("would answer wait-exceeded", "shadow") == would + 2
        assert (record.state.episode_start, record.state.terminal_at) == (1012.0, 0.0)
