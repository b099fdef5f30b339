"""The cross-replica herd shield (jobs.<name>.min_poll_interval): the pure rules, the waiting
claimant under an injected clock, then two real pollguard replicas on one real Redis in front
of a real upstream that counts its polls."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.coalesce import Shared
from proxy.errors import StoreUnavailable
from proxy.shield import (
    MAX_WAIT_SECONDS,
    SHIELD_BODY_LIMIT,
    Shield,
    ShieldedAnswer,
    Ticket,
    decode,
    encode,
    publishable,
    reused,
    shield_digest,
)
from proxy.stores import MemoryJobStore
from proxy.stores.base import SHIELD_CLAIM
from tests.conftest import RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import guard_config
from tests.servers import ProxyProcess, ThreadedServer

PENDING = frozenset({202})
WAIT = 60.0  # a waiter's own limit, longer than every interval below unless a test says so
T0 = 1_700_000_000.0
FILE = "/api/recordings/file/CA1"


def pending_answer(retry_after: bytes = b"4", body: bytes = b'{"status":"queued"}') -> Shared:
    return Shared(
        202,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", b"first"),
            (b"retry-after", retry_after),
            (b"cache-control", b"no-store"),
        ],
        body,
        False,
    )


# -- pure rules ---------------------------------------------------------------------------------


def test_an_entry_reads_back_as_the_answer_without_per_client_fields() -> None:
    entry = encode(pending_answer(), T0)
    assert entry is not None
    answer = decode(entry)
    assert answer == ShieldedAnswer(
        202,
        [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
        b'{"status":"queued"}',
        4,
        T0,
    )


def test_an_http_date_retry_after_is_kept_as_sent() -> None:
    date = b"Wed, 21 Oct 2026 07:28:00 GMT"
    entry = encode(pending_answer(retry_after=date), T0)
    assert entry is not None
    answer = decode(entry)
    assert answer is not None and answer.retry_after is None
    headers, _ = reused(answer, b"mine", T0 + 3)
    assert (b"retry-after", date) in headers


@pytest.mark.parametrize(
    ("elapsed", "expected"), [(0.0, b"4"), (0.5, b"4"), (1.2, b"3"), (3.9, b"1"), (60.0, b"1")]
)
def test_a_reused_answers_retry_after_counts_down(elapsed: float, expected: bytes) -> None:
    """From what was first sent, rounded up, never below 1; the copy names its own request and
    carries its body's length."""
    entry = encode(pending_answer(), T0)
    assert entry is not None
    answer = decode(entry)
    assert answer is not None
    headers, body = reused(answer, b"mine", T0 + elapsed)
    fields = dict(headers)
    assert fields[b"retry-after"] == expected
    assert fields[b"x-request-id"] == b"mine"
    assert fields[b"content-length"] == str(len(body)).encode()
    assert [name for name, _ in headers].count(b"retry-after") == 1


def test_a_clock_going_back_never_raises_the_retry_after() -> None:
    entry = encode(pending_answer(), T0)
    assert entry is not None
    answer = decode(entry)
    assert answer is not None
    assert dict(reused(answer, b"x", T0 - 100)[0])[b"retry-after"] == b"4"


def _entry(head: object, body: bytes = b"{}") -> bytes:
    return json.dumps(head).encode() + b"\n" + body


GOOD_HEAD = {"v": 1, "s": 202, "h": [["content-type", "application/json"]], "r": 2, "t": T0}


@pytest.mark.parametrize(
    "entry",
    [
        b"",
        b"not json\n{}",
        b'{"v":1}',  # no newline: no body part
        _entry({**GOOD_HEAD, "v": 2}),
        _entry([1, 2]),
        _entry({**GOOD_HEAD, "s": 99}),
        _entry({**GOOD_HEAD, "s": True}),
        _entry({**GOOD_HEAD, "s": "202"}),
        _entry({**GOOD_HEAD, "r": -1}),
        _entry({**GOOD_HEAD, "r": 1.5}),
        _entry({**GOOD_HEAD, "t": True}),
        _entry({**GOOD_HEAD, "t": "now"}),
        b'{"v":1,"s":202,"h":[],"r":null,"t":NaN}\n{}',
        _entry({**GOOD_HEAD, "h": [["x-evil", "a\r\nset-cookie: s=1"]]}),
        _entry({**GOOD_HEAD, "h": [["x evil", "a"]]}),
        _entry({**GOOD_HEAD, "h": [["x-a", "\u0100"]]}),
        _entry({**GOOD_HEAD, "h": [["x-a"]]}),
        _entry({**GOOD_HEAD, "h": [["x-a", 1]]}),
        _entry({**GOOD_HEAD, "h": "x-a: 1"}),
        _entry({**GOOD_HEAD, "h": [["x-a", "1"]] * 101}),
        _entry({**GOOD_HEAD, "h": [["content-length", "9999"]]}),
        _entry({**GOOD_HEAD, "h": [["x-request-id", "someone-else"]]}),
        _entry({**GOOD_HEAD, "h": [["retry-after", "3"]]}),  # and "r": two Retry-Afters
        _entry(GOOD_HEAD, b"x" * (SHIELD_BODY_LIMIT + 1)),
        b"[" * 100_000 + b"\n{}",
    ],
)
def test_an_entry_pollguard_did_not_write_is_not_served(entry: bytes) -> None:
    """The store is shared: whatever is in it may be garbage or hostile — no header injection,
    no false length, no someone else's request id, no unbounded body."""
    assert decode(entry) is None


def test_a_good_entry_of_the_same_shape_is_served() -> None:
    """The table above fails for its one defect, not for the shape around it."""
    assert decode(_entry(GOOD_HEAD)) is not None


def test_bodies_above_the_limit_are_not_kept() -> None:
    assert encode(pending_answer(body=b"x" * SHIELD_BODY_LIMIT), T0) is not None
    assert encode(pending_answer(body=b"x" * (SHIELD_BODY_LIMIT + 1)), T0) is None


def test_the_digest_separates_credentials_targets_and_methods() -> None:
    a = [(b"authorization", b"Bearer a")]
    base = shield_digest("GET", b"/f/CA1", a)
    assert shield_digest("GET", b"/f/CA1", [*a, (b"accept", b"*/*")]) == base
    assert shield_digest("GET", b"/f/CA1", [(b"authorization", b"Bearer b")]) != base
    assert shield_digest("GET", b"/f/CA1", [*a, (b"cookie", b"s=1")]) != base
    assert shield_digest("GET", b"/f/CA1?x=1", a) != base
    assert shield_digest("HEAD", b"/f/CA1", a) != base
    assert shield_digest("GET", b"/f/CA1", []) != base
    # Two cookie fields are not the same credentials as one field joining them.
    two = [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
    assert shield_digest("GET", b"/x", two) != shield_digest("GET", b"/x", [(b"cookie", b"a=1b=2")])


@pytest.mark.parametrize(
    ("shared", "expected"),
    [
        (pending_answer(), True),
        (None, False),
        (Shared(200, [], b"ready", False), False),
        (Shared(500, [], b'{"code":"job-stuck"}', True), False),
        (Shared(202, [], b'{"request_id":"x"}', True), False),  # pollguard's re-prepared 202
    ],
)
def test_only_a_pass_through_pending_answer_is_published(
    shared: Shared | None, expected: bool
) -> None:
    assert publishable(shared, PENDING) is expected


# -- the store side, with an injected clock --------------------------------------------------


class FakeTime:
    """A wall clock that moves only when the shield sleeps."""

    def __init__(self) -> None:
        self.now = T0
        self.slept: list[float] = []
        self.on_sleep: list[object] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.anyio
async def test_the_first_claims_and_the_next_wait_for_its_answer(anyio_backend: str) -> None:
    store = MemoryJobStore()
    time = FakeTime()
    shield = Shield(store, clock=time.clock, sleep=time.sleep)
    first = await shield.enter("rec", "CA1", "d", 2.0, PENDING, WAIT)
    assert first == Ticket("rec", "CA1", "d", PENDING)

    published = False

    async def publish_on_third_sleep(seconds: float) -> None:
        nonlocal published
        await time.sleep(seconds)
        if len(time.slept) == 3 and not published:
            published = True
            shield.settle(first, pending_answer())
            await shield.settled()

    waiting = Shield(store, clock=time.clock, sleep=publish_on_third_sleep)
    answer = await waiting.enter("rec", "CA1", "d", 2.0, PENDING, WAIT)
    assert isinstance(answer, ShieldedAnswer)
    assert answer.body == b'{"status":"queued"}'
    # Backing off: 20 ms, doubling, capped.
    assert time.slept == [0.02, 0.04, 0.08]
    assert max(time.slept) <= MAX_WAIT_SECONDS


@pytest.mark.anyio
async def test_a_claim_never_answered_is_waited_for_at_most_the_interval(
    anyio_backend: str,
) -> None:
    """The claimant died or hangs: the waiter goes upstream itself (None) within the interval."""
    store = MemoryJobStore()
    time = FakeTime()
    await Shield(store, clock=time.clock, sleep=time.sleep).enter(
        "rec", "CA1", "d", 1.0, PENDING, WAIT
    )
    waiter = Shield(store, clock=time.clock, sleep=time.sleep)
    assert await waiter.enter("rec", "CA1", "d", 1.0, PENDING, WAIT) is None
    assert 0.8 <= sum(time.slept) <= 1.0


@pytest.mark.anyio
async def test_a_claim_is_waited_for_at_most_the_wait_limit(anyio_backend: str) -> None:
    """A long interval (a dead claimant's claim outlives it by minutes): the waiter gives up
    after its own limit (the upstream's connect + read timeout) and goes upstream itself."""
    store = MemoryJobStore()
    time = FakeTime()
    await Shield(store, clock=time.clock, sleep=time.sleep).enter(
        "rec", "CA1", "d", 600.0, PENDING, WAIT
    )
    waiter = Shield(store, clock=time.clock, sleep=time.sleep)
    assert await waiter.enter("rec", "CA1", "d", 600.0, PENDING, 0.5) is None
    assert 0.3 <= sum(time.slept) <= 0.5


@pytest.mark.anyio
async def test_an_answer_not_to_reuse_releases_the_claim(anyio_backend: str) -> None:
    store = MemoryJobStore()
    time = FakeTime()
    shield = Shield(store, clock=time.clock, sleep=time.sleep)
    ticket = await shield.enter("rec", "CA1", "d", 30.0, PENDING, WAIT)
    assert isinstance(ticket, Ticket)
    shield.settle(ticket, Shared(200, [], b"ready", False))
    await shield.settled()
    assert isinstance(await shield.enter("rec", "CA1", "d", 30.0, PENDING, WAIT), Ticket)


@pytest.mark.anyio
async def test_the_entry_ends_with_its_interval(anyio_backend: str) -> None:
    store = MemoryJobStore()
    time = FakeTime()
    shield = Shield(store, clock=time.clock, sleep=time.sleep)
    ticket = await shield.enter("rec", "CA1", "d", 2.0, PENDING, WAIT)
    assert isinstance(ticket, Ticket)
    shield.settle(ticket, pending_answer())
    await shield.settled()
    time.now += 1.9
    assert isinstance(await shield.enter("rec", "CA1", "d", 2.0, PENDING, WAIT), ShieldedAnswer)
    time.now += 0.1
    assert isinstance(await shield.enter("rec", "CA1", "d", 2.0, PENDING, WAIT), Ticket)


class FailingStore(MemoryJobStore):
    async def shield_enter(
        self, job: str, key: str, digest: str, interval: float, now: float
    ) -> bytes | None:
        raise StoreUnavailable("Redis shield of rec/CA1 failed: timeout")


@pytest.mark.anyio
async def test_a_failing_store_means_no_shield_not_no_answer(anyio_backend: str) -> None:
    time = FakeTime()
    shield = Shield(FailingStore(), clock=time.clock, sleep=time.sleep)
    assert await shield.enter("rec", "CA1", "d", 2.0, PENDING, WAIT) is None


@pytest.mark.anyio
async def test_the_memory_store_holds_a_bounded_number_of_entries(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.stores.memory as memory

    monkeypatch.setattr(memory, "MAX_SHIELD_ENTRIES", 3)
    store = MemoryJobStore()
    for index in range(10):
        assert await store.shield_enter("rec", f"K{index}", "d", 60.0, T0) is None
    assert len(store._shield) == 3
    # The newest are kept; the oldest went.
    assert await store.shield_enter("rec", "K9", "d", 60.0, T0) == SHIELD_CLAIM
    assert await store.shield_enter("rec", "K0", "d", 60.0, T0) is None


# -- two real replicas on one real Redis -------------------------------------------------------


class CountingUpstream:
    """A job backend answering 202 (or 200 once `ready`), counting polls per Authorization."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.ready = False

    def app(self) -> Starlette:
        async def file(request: Request) -> Response:
            with self.lock:
                self.seen[request.headers.get("authorization", "-")] += 1
            if self.ready:
                return Response(b"RIFF....", media_type="audio/wav")
            return JSONResponse({"status": "queued"}, status_code=202, headers={"Retry-After": "3"})

        return Starlette(routes=[Route("/api/recordings/file/{sid}", file)])

    def total(self) -> int:
        with self.lock:
            return sum(self.seen.values())


@pytest.fixture
def counting() -> Iterator[tuple[CountingUpstream, ThreadedServer]]:
    upstream = CountingUpstream()
    with ThreadedServer(upstream.app()) as server:
        yield upstream, server


def shielded(proxy: ProxyProcess) -> float:
    for line in httpx.get(f"{proxy.url}/-/metrics", timeout=5).text.splitlines():
        if line.startswith('pollguard_shielded_requests_total{job="recording"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def two_replicas(
    upstream_url: str, redis: RedisServer, interval: str
) -> tuple[ProxyProcess, ProxyProcess]:
    """Two replicas sharing one Redis. state.timeout is generous: on 2 loaded cores a first
    script call can outlast 250 ms, and a failed shield call means polling upstream (by design,
    which is not what these tests are about)."""
    config = guard_config(
        upstream_url,
        redis_url=redis.url,
        stuck_after="1h",
        max_wait="2h",
        retry_after_max="10s",
        min_poll_interval=interval,
    )
    config["state"] = {"redis_url": redis.url, "on_error": "pass", "timeout": "2s"}
    return ProxyProcess(config), ProxyProcess(config)


def test_one_upstream_poll_per_interval_across_two_replicas(
    counting: tuple[CountingUpstream, ThreadedServer], redis_server: RedisServer
) -> None:
    """Ten polls alternating between two replicas within the interval: the upstream sees the
    first alone; each client gets the pending answer with its own request id and an honest
    Retry-After; another client's credentials are another answer."""
    upstream, server = counting
    first_replica, second_replica = two_replicas(server.url, redis_server, "1m")
    with first_replica as a, second_replica as b, httpx.Client(timeout=10) as client:
        bearer = {"authorization": "Bearer a"}
        answers = [
            client.get(f"{(a, b)[index % 2].url}{FILE}", headers=bearer) for index in range(10)
        ]
        assert upstream.total() == 1
        assert [answer.status_code for answer in answers] == [202] * 10
        assert {answer.content for answer in answers} == {b'{"status":"queued"}'}
        assert len({answer.headers["x-request-id"] for answer in answers}) == 10
        assert all(1 <= int(answer.headers["retry-after"]) <= 3 for answer in answers)
        assert all(answer.headers["cache-control"] == "no-store" for answer in answers)
        assert shielded(a) + shielded(b) == 9
        other = client.get(f"{b.url}{FILE}", headers={"authorization": "Bearer b"})
        assert other.status_code == 202
        assert upstream.seen == Counter({"Bearer a": 1, "Bearer b": 1})
        # HEAD and Range are never answered from the shield.
        client.head(f"{a.url}{FILE}", headers=bearer)
        client.get(f"{a.url}{FILE}", headers={**bearer, "range": "bytes=0-"})
        assert upstream.seen["Bearer a"] == 3


def test_the_next_poll_after_the_interval_reaches_the_upstream(
    counting: tuple[CountingUpstream, ThreadedServer], redis_server: RedisServer
) -> None:
    """The entry expires with its interval; a ready answer is never kept, so every poll after
    the job is ready reaches the upstream and gets the file."""
    upstream, server = counting
    first_replica, second_replica = two_replicas(server.url, redis_server, "300ms")
    with first_replica as a, second_replica as b, httpx.Client(timeout=10) as client:
        assert client.get(f"{a.url}{FILE}").status_code == 202
        wait_until(
            lambda: client.get(f"{b.url}{FILE}").status_code == 202 and upstream.total() >= 2,
            10,
            "a poll after the interval reaching the upstream",
        )
        upstream.ready = True
        wait_until(
            lambda: client.get(f"{b.url}{FILE}").status_code == 200, 10, "the file being served"
        )
        before = upstream.total()
        for proxy in (a, b, a):
            answer = client.get(f"{proxy.url}{FILE}")
            assert answer.status_code == 200 and answer.content == b"RIFF...."
        assert upstream.total() == before + 3


def test_min_poll_interval_is_bounded_at_load() -> None:
    from proxy.config import MAX_MIN_POLL_INTERVAL, JobConfig

    base = guard_config("http://127.0.0.1:1")["jobs"]
    assert isinstance(base, dict)
    job = dict(base["recording"])
    assert JobConfig.model_validate({**job, "min_poll_interval": "0"}).min_poll_interval == 0
    assert JobConfig.model_validate({**job, "min_poll_interval": "2s"}).min_poll_interval == 2
    with pytest.raises(ValueError, match="min_poll_interval"):
        JobConfig.model_validate({**job, "min_poll_interval": MAX_MIN_POLL_INTERVAL + 1})


def test_a_herd_on_two_replicas_makes_one_upstream_poll(redis_server: RedisServer) -> None:
    """Twenty identical polls at once, ten per replica, while the first is upstream: on each
    replica nine follow their leader (proxy.coalesce); the other replica's leader finds the
    claim and waits for the answer instead of polling too. The upstream sees one request."""
    from tests.test_coalesce import HeldUpstream, coalesced, poll_all

    upstream = HeldUpstream()
    with ThreadedServer(upstream.app()) as server:
        try:
            first_replica, second_replica = two_replicas(server.url, redis_server, "1m")
            with first_replica as a, second_replica as b:
                bearer = {"authorization": "Bearer a"}
                answers_a, threads_a = poll_all(a, [bearer] * 10)
                answers_b, threads_b = poll_all(b, [bearer] * 10)
                wait_until(
                    lambda: coalesced(a) + coalesced(b) == 18, 10, "nine followers per replica"
                )
                assert upstream.total() == 1, a.logs()[-1500:] + b.logs()[-1500:]
                upstream.gate.set()
                for thread in [*threads_a, *threads_b]:
                    thread.join(timeout=20)
                assert shielded(a) + shielded(b) == 1  # the waiting leader
        finally:
            upstream.gate.set()
    answers = [*answers_a, *answers_b]
    assert upstream.total() == 1
    assert [answer.status_code for answer in answers] == [202] * 20
    assert len({answer.headers["x-request-id"] for answer in answers}) == 20


@pytest.mark.anyio
async def test_a_foreign_entry_goes_upstream_and_is_logged_sparingly(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry pollguard did not write (another program, a damaged store): every poll goes
    upstream (None), and the warning comes once per GARBAGE_LOG_INTERVAL, not once per poll."""
    from proxy.shield import GARBAGE_LOG_INTERVAL

    store = MemoryJobStore()
    time = FakeTime()
    assert await store.shield_enter("rec", "CA1", "d", 60.0, T0) is None
    await store.shield_publish("rec", "CA1", "d", b"\xff not ours")
    shield = Shield(store, clock=time.clock, sleep=time.sleep)
    with caplog.at_level("WARNING", logger="pollguard.shield"):
        for _ in range(5):
            assert await shield.enter("rec", "CA1", "d", 60.0, PENDING, WAIT) is None
        time.now += GARBAGE_LOG_INTERVAL
        assert await shield.enter("rec", "CA1", "d", 60.0, PENDING, WAIT) is None
    assert len([r for r in caplog.records if "not one pollguard wrote" in r.message]) == 2
