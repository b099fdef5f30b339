"""Redis job-state store shared by all replicas.

Layout: one HASH per (job, key) at `<key_prefix>{<job>:<key>}`, e.g. `pollguard:{recording:CA123}`.
The whole `job:key` is the Redis Cluster hash tag, so records spread over slots while anything ever
stored beside a record lands in the same slot (Lua scripts may only touch keys of one slot).
Fields: episode_start, clock_start, window_start, lock_until, terminal_at (floats as `repr`, which
round-trips exactly), attempts, version (decimal ints), terminal (a problem code, "" for none).
Records written before terminal_at and terminal existed (6 fields; an older replica during a
rolling upgrade) read as not terminal; hint_clock ("", "queued" or "running") and hint_since (a
float) likewise read as no backend clock when missing (8 fields). The scripts only copy and compare strings, so no value
passes through Lua's number type. Expiry is the key's PEXPIRE, judged by Redis's clock.

Every failure, including garbage in a record, surfaces as StoreUnavailable; deadline, retries
and circuit breaker are in proxy.stores.redis_calls, EVALSHA and NOSCRIPT in redis_scripts.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from proxy.stores.base import (
    AUDIT_MAX_ENTRIES,
    HINT_CLOCKS,
    NO_HINT_CLOCK,
    NO_HINT_SINCE,
    NO_TERMINAL,
    SHIELD_CLAIM,
    EpisodeRecord,
    JobState,
    ScanPage,
    Terminal,
    fresh_state,
)
from proxy.stores.breaker import DEFAULT_COOLDOWN_SECONDS, BreakerState
from proxy.stores.redis_calls import (
    DEFAULT_REFUSED_RETRIES,
    DEFAULT_TIMEOUT_SECONDS,
    RedisCalls,
    StoreErrors,
    redis_answered,
)
from proxy.stores.redis_scripts import ScriptCall, lua_script, run_script, run_script_batch
from proxy.stores.redis_topology import (
    RedisClient,
    RedisTopology,
    cluster_scan_step,
    connect,
    parse_cluster_cursor,
)

DEFAULT_KEY_PREFIX = "pollguard:"
MIN_TTL_MILLISECONDS = 1
# The jobs gauge's shared counts vanish this long after the last replica refreshed them.
COUNTS_TTL_SECONDS = 60.0

_FIELDS = (
    "episode_start",
    "clock_start",
    "window_start",
    "attempts",
    "lock_until",
    "version",
    "terminal_at",
    "terminal",
    "hint_clock",
    "hint_since",
)
# The fields every record has; the rest may be missing from one an older replica created.
_REQUIRED_FIELDS = 6

# Not read by the guard: the time of the last observe, for the admin API (same round trip).
_LAST_POLL = "last_poll"
# What the admin API reads of a record: the state fields, then last_poll.
_ADMIN_FIELDS = (*_FIELDS, _LAST_POLL)

# KEYS[1] record; ARGV: fresh field values in _FIELDS order, the TTL in ms, then `now`.
_OBSERVE = lua_script("""
local current = redis.call('HMGET', KEYS[1], 'episode_start', 'clock_start', 'window_start',
                           'attempts', 'lock_until', 'version', 'terminal_at', 'terminal',
                           'hint_clock', 'hint_since')
if current[6] then
  redis.call('HSET', KEYS[1], 'last_poll', ARGV[12])
  return current
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[1], 'clock_start', ARGV[2],
           'window_start', ARGV[3], 'attempts', ARGV[4], 'lock_until', ARGV[5], 'version', ARGV[6],
           'terminal_at', ARGV[7], 'terminal', ARGV[8], 'hint_clock', ARGV[9],
           'hint_since', ARGV[10], 'last_poll', ARGV[12])
redis.call('PEXPIRE', KEYS[1], ARGV[11])
return {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9],
        ARGV[10]}
""")

# KEYS[1] record; ARGV[1] "1" to delete it. Returns _ADMIN_FIELDS' values then the PTTL, or
# just {PTTL} when the key holds something other than a hash (deleted all the same).
_READ = lua_script("""
local values = redis.pcall('HMGET', KEYS[1], 'episode_start', 'clock_start', 'window_start',
                           'attempts', 'lock_until', 'version', 'terminal_at', 'terminal',
                           'hint_clock', 'hint_since', 'last_poll')
local ttl = redis.call('PTTL', KEYS[1])
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
end
if values['err'] then
  return {ttl}
end
values[12] = ttl
return values
""")

# KEYS[1] record; ARGV: expected version, new field values in _FIELDS order, then the TTL in ms.
_SWAP = lua_script("""
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[2], 'clock_start', ARGV[3],
           'window_start', ARGV[4], 'attempts', ARGV[5], 'lock_until', ARGV[6], 'version', ARGV[7],
           'terminal_at', ARGV[8], 'terminal', ARGV[9], 'hint_clock', ARGV[10],
           'hint_since', ARGV[11])
redis.call('PEXPIRE', KEYS[1], ARGV[12])
return 1
""")


# KEYS[1] shield entry; ARGV: the claim marker, the interval in ms. The entry, or nil after
# claiming it.
_SHIELD_ENTER = lua_script("""
local entry = redis.call('GET', KEYS[1])
if entry then
  return entry
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
""")

# KEYS[1] shield entry; ARGV: the claim marker. Deleted only while it still holds a claim.
_SHIELD_RELEASE = lua_script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


@dataclass(slots=True)
class _Observe:
    call: ScriptCall
    epoch: int  # the breaker epoch it was admitted in
    enqueued_at: float  # loop time: its deadline is enqueued_at + timeout
    result: asyncio.Future[Any]


def record_key(key_prefix: str, job: str, key: str) -> str:
    """The Redis key of (job, key)'s record."""
    return f"{key_prefix}{{{job}:{key}}}"


def _encode(state: JobState) -> list[str]:
    return [
        repr(state.episode_start),
        repr(state.clock_start),
        repr(state.window_start),
        str(state.attempts),
        repr(state.lock_until),
        str(state.version),
        repr(state.terminal_at),
        str(state.terminal),
        state.hint_clock,
        repr(state.hint_since),
    ]


def _decode(raw: Sequence[Any]) -> JobState:
    """A record from its _FIELDS values; ValueError (or UnicodeError) for one we can't read.
    terminal_at and terminal, and hint_clock and hint_since, may each pair be missing (a
    record an older replica created)."""
    required = raw[:_REQUIRED_FIELDS]
    if len(raw) != len(_FIELDS) or any(value is None for value in required):
        raise ValueError(f"incomplete record {raw!r}")
    text = [
        "" if value is None else value.decode("ascii") if isinstance(value, bytes) else str(value)
        for value in raw
    ]
    terminal_at, terminal = NO_TERMINAL, Terminal.NONE
    if raw[6] is not None or raw[7] is not None:
        terminal_at, terminal = float(text[6]), Terminal(text[7])
        # Both or neither: a terminal mark without its answer (or one without a time) is garbage.
        if (terminal_at == NO_TERMINAL) != (terminal is Terminal.NONE) or not math.isfinite(
            terminal_at
        ):
            raise ValueError(f"inconsistent terminal mark {raw[6:8]!r}")
    hint_clock, hint_since = NO_HINT_CLOCK, NO_HINT_SINCE
    if raw[8] is not None or raw[9] is not None:
        hint_clock, hint_since = text[8], float(text[9])
        if hint_clock not in HINT_CLOCKS or not math.isfinite(hint_since):
            raise ValueError(f"invalid backend clock {raw[8:]!r}")
    return JobState(
        episode_start=float(text[0]),
        clock_start=float(text[1]),
        window_start=float(text[2]),
        attempts=int(text[3]),
        lock_until=float(text[4]),
        version=int(text[5]),
        terminal_at=terminal_at,
        terminal=terminal,
        hint_clock=hint_clock,
        hint_since=hint_since,
    )


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern: `*?[]\\` each escaped with a backslash."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _admin_record(job: str, key: str, values: Sequence[Any], pttl: Any) -> EpisodeRecord | None:
    """None when the key does not exist; state None when it holds what we can't read."""
    try:
        ttl_ms = int(pttl)
    except (TypeError, ValueError):
        return EpisodeRecord(job, key, None, None, None)
    if ttl_ms == -2:
        return None  # no such key
    expires_in = None if ttl_ms < 0 else ttl_ms / 1000
    try:
        state: JobState | None = _decode(values[: len(_FIELDS)])
        last = values[len(_FIELDS)]
        last_poll = None if last is None else float(last)
        if last_poll is not None and not math.isfinite(last_poll):
            last_poll = None
    except (ValueError, UnicodeError):
        state, last_poll = None, None
    return EpisodeRecord(job, key, state, last_poll, expires_in)


def _ttl_milliseconds(ttl: float) -> int:
    return max(MIN_TTL_MILLISECONDS, math.ceil(ttl * 1000))


class RedisJobStore:
    """JobStore on Redis; observe and swap are each one atomic Lua round trip (EVALSHA).

    Every call ends within `timeout` and, after a failure, Redis is skipped for
    `breaker_cooldown` (proxy.stores.redis_calls).
    """

    def __init__(
        self,
        url: str | None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        *,
        breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        refused_retries: int = DEFAULT_REFUSED_RETRIES,
        clock: Callable[[], float] = time.monotonic,
        topology: RedisTopology | None = None,
    ) -> None:
        """`url` is state.redis_url; `topology` (proxy.stores.redis_topology) is given for a
        cluster or Sentinel, and then carries `url` itself."""
        self._key_prefix = key_prefix
        self._calls = RedisCalls(
            timeout, breaker_cooldown, refused_retries=refused_retries, clock=clock
        )
        topology = topology or RedisTopology(url=url)
        # The pool opens connections lazily and replaces broken ones, so the same store
        # recovers by itself once Redis is back. No socket_timeout: the deadline around each
        # call bounds every read, and redis-py would wrap each send in asyncio.wait_for (a
        # task per command) and each read in a timer of its own. Retries are ours
        # (RedisCalls.retrying), so redis-py's are off (a cluster client keeps one, to map
        # the cluster again: proxy.stores.redis_topology).
        with StoreErrors(
            f"{topology.mode} settings {topology.url!r}",
            template="invalid Redis {what}: {detail}",
            detail=str,
            kinds=(RedisError, ValueError),
        ):
            self._client: RedisClient = connect(topology, timeout)
        self._queued: list[_Observe] = []
        self._flushing = False
        self._flusher: asyncio.Future[None] | None = None

    @property
    def timeout(self) -> float:
        """The deadline of every call, retries included (state.timeout)."""
        return self._calls.timeout

    @property
    def breaker_cooldown(self) -> float:
        """How long Redis is skipped after a failed call (state.breaker_cooldown)."""
        return self._calls.breaker_cooldown

    @property
    def breaker(self) -> BreakerState:
        """The circuit breaker's current state (for tests and diagnostics)."""
        return self._calls.breaker

    def observe_local(self, job: str, key: str, now: float, ttl: float) -> None:
        """Records live in Redis: every read is a round trip (the guard's RecentRecords is what
        spares some)."""
        return None

    async def observe(self, job: str, key: str, now: float, ttl: float) -> JobState:
        """One EVALSHA. Observes that arrive while another is in flight wait for it and then
        go out together in one pipeline (auto-pipelining): under load a replica pays one
        round trip, one pool checkout and one write per batch instead of per poll."""
        what = f"observe of {job}/{key}"
        epoch = self._calls.admit(what)
        loop = asyncio.get_running_loop()
        args = [*_encode(fresh_state(now)), str(_ttl_milliseconds(ttl)), repr(now)]
        call = _Observe(
            ScriptCall(self._key(job, key), args), epoch, loop.time(), loop.create_future()
        )
        self._queued.append(call)
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.ensure_future(self._flush_observes())
        with StoreErrors(what):
            return _decode(await call.result)

    async def _flush_observes(self) -> None:
        try:
            while self._queued:
                batch = [call for call in self._queued if not call.result.done()]
                self._queued = []
                if batch:
                    await self._run_observes(batch)
        finally:
            self._flushing = False

    async def _run_observes(self, batch: list[_Observe]) -> None:
        calls = [observe.call for observe in batch]
        # The oldest call's deadline bounds the batch: no call waits longer than `timeout` in
        # all, queueing behind the previous batch included, with one timer per batch.
        deadline = batch[0].enqueued_at + self._calls.timeout
        try:
            async with asyncio.timeout_at(deadline):
                if len(batch) == 1:  # a one-command pipeline costs more than a plain call
                    results: list[Any] = [
                        await self._calls.retrying(
                            lambda: run_script(self._client, _OBSERVE, calls[0])
                        )
                    ]
                else:
                    results = await self._calls.retrying(
                        lambda: run_script_batch(self._client, _OBSERVE, calls)
                    )
        except BaseException as exc:
            if isinstance(exc, Exception) and not redis_answered(exc):
                # Calls queued meanwhile would wait on the same dead server: fail them now.
                batch += self._queued
                self._queued = []
            for observe in batch:
                self._calls.settle(observe.epoch, exc)
                if observe.result.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    observe.result.cancel()
                else:
                    observe.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for observe, outcome in zip(batch, results, strict=True):
            # Each call by its own outcome: an error reply proves Redis answered, but a cluster
            # pipeline returns a master's broken connection in its calls' results too, and that
            # must open the breaker as it would have raised.
            failure = outcome if isinstance(outcome, BaseException) else None
            self._calls.settle(observe.epoch, failure)
            if observe.result.done():  # its request was cancelled (client gone)
                continue
            if failure is not None:
                observe.result.set_exception(failure)
            else:
                observe.result.set_result(outcome)

    async def swap(
        self, job: str, key: str, expected_version: int, new: JobState, ttl: float
    ) -> JobState | None:
        stored = replace(new, version=expected_version + 1)
        args = [str(expected_version), *_encode(stored), str(_ttl_milliseconds(ttl))]
        call = ScriptCall(self._key(job, key), args)
        swapped = await self._calls.call(
            f"swap of {job}/{key}", lambda: run_script(self._client, _SWAP, call)
        )
        return stored if swapped == 1 else None

    async def forget(self, job: str, key: str) -> None:
        record = self._key(job, key)
        await self._calls.call(f"forget of {job}/{key}", lambda: self._client.delete(record))

    async def read(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        return await self._read(job, key, delete=False)

    async def reset(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        """One script: read and DEL atomically, so what it returns is exactly what was deleted
        (an unreadable record is deleted too, and returned with state None)."""
        return await self._read(job, key, delete=True)

    async def _read(self, job: str, key: str, *, delete: bool) -> EpisodeRecord | None:
        call = ScriptCall(self._key(job, key), ["1" if delete else "0"])
        what = f"{'reset' if delete else 'read'} of {job}/{key}"
        raw = await self._calls.call(what, lambda: run_script(self._client, _READ, call))
        if len(raw) != len(_ADMIN_FIELDS) + 1:
            # WRONGTYPE: something that is not a record sits under the record's name.
            return None if raw[0] == -2 else EpisodeRecord(job, key, None, None, None)
        return _admin_record(job, key, raw[: len(_ADMIN_FIELDS)], raw[len(_ADMIN_FIELDS)])

    async def scan(self, job: str, cursor: str, count: int, now: float) -> ScanPage:
        """One SCAN step (MATCH on the job's escaped key pattern; never KEYS), then one
        pipeline of HMGET + PTTL for the keys it found. SCAN's COUNT is a hint: a step may
        return more keys than `count`, or none with more to come; each key that exists for the
        whole listing is returned at least once (Redis's SCAN guarantee)."""
        head = f"{self._key_prefix}{{{job}:"
        pattern = glob_escape(head) + "*"
        next_cursor, names = await self._scan_step(job, cursor, pattern, count)
        keys: list[tuple[bytes | str, str]] = []
        invalid = 0
        for name in names:
            try:
                text = name.decode("utf-8") if isinstance(name, bytes) else str(name)
            except UnicodeDecodeError:
                invalid += 1
                continue
            if not (text.startswith(head) and text.endswith("}")) or len(text) <= len(head) + 1:
                invalid += 1
                continue
            keys.append((name, text[len(head) : -1]))
        records: list[EpisodeRecord] = []
        if keys:

            async def fetch() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for name, _ in keys:
                    pipe.hmget(name, list(_ADMIN_FIELDS))
                    pipe.pttl(name)
                return await pipe.execute(raise_on_error=False)

            replies = await self._calls.call(f"read of {len(keys)} {job} record(s)", fetch)
            for index, (_, key) in enumerate(keys):
                values, pttl = replies[2 * index], replies[2 * index + 1]
                if isinstance(values, BaseException) or isinstance(pttl, BaseException):
                    records.append(EpisodeRecord(job, key, None, None, None))
                    continue
                record = _admin_record(job, key, values, pttl)
                if record is not None:  # None: deleted between SCAN and HMGET
                    records.append(record)
        return ScanPage(records, next_cursor, invalid)

    async def _scan_step(
        self, job: str, cursor: str, pattern: str, count: int
    ) -> tuple[str | None, list[Any]]:
        """One SCAN; in cluster mode on one master, the cursor naming which (and the masters
        are walked in turn: every master's keys are listed)."""
        client = self._client
        if isinstance(client, RedisCluster):
            start = parse_cluster_cursor(cursor)
            return await self._calls.call(
                f"scan of {job}", lambda: cluster_scan_step(client, start, pattern, count)
            )
        try:
            position = int(cursor)
        except ValueError:
            raise ValueError(f"invalid cursor {cursor!r}") from None
        if position < 0:
            raise ValueError(f"invalid cursor {cursor!r}")
        next_position, names = await self._calls.call(
            f"scan of {job}",
            lambda: client.scan(cursor=position, match=pattern, count=count),
        )
        return (None if int(next_position) == 0 else str(next_position)), list(names)

    async def audit_append(self, entry: Mapping[str, Any]) -> None:
        """XADD to a stream capped near AUDIT_MAX_ENTRIES (MAXLEN ~: Redis trims whole nodes)."""
        data = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
        name = self._audit_key
        await self._calls.call(
            "audit append",
            lambda: self._client.xadd(
                name, {"entry": data}, maxlen=AUDIT_MAX_ENTRIES, approximate=True
            ),
        )

    async def audit_read(self, limit: int) -> list[dict[str, Any]]:
        name = self._audit_key
        rows: Any = await self._calls.call(
            "audit read", lambda: self._client.xrevrange(name, count=limit)
        )
        entries: list[dict[str, Any]] = []
        for _, fields in rows or ():
            try:
                entry = json.loads(fields[b"entry"])
            except (KeyError, TypeError, ValueError):
                continue  # not written by pollguard: skipped
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    async def claim_lease(self, name: str, seconds: float) -> bool:
        """SET NX PX: the first replica to ask in `seconds` gets it."""
        lease = f"{self._key_prefix}admin:lease:{name}"
        claimed = await self._calls.call(
            f"lease {name}",
            lambda: self._client.set(lease, "1", nx=True, px=_ttl_milliseconds(seconds)),
        )
        return bool(claimed)

    async def write_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the hash in one MULTI; it expires after COUNTS_TTL_SECONDS unless rewritten,
        so counts nobody refreshes any more are not exported forever."""
        name = self._counts_key

        async def replace_hash() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(name)
            if counts:
                pipe.hset(name, mapping={field: str(value) for field, value in counts.items()})
                pipe.pexpire(name, _ttl_milliseconds(COUNTS_TTL_SECONDS))
            return await pipe.execute()

        await self._calls.call("counts write", replace_hash)

    async def read_counts(self) -> dict[str, int]:
        name = self._counts_key
        raw: Any = await self._calls.call("counts read", lambda: self._client.hgetall(name))
        counts: dict[str, int] = {}
        for field, value in raw.items():
            try:
                text = field.decode("utf-8") if isinstance(field, bytes) else str(field)
                counts[text] = int(value)
            except (UnicodeDecodeError, ValueError):
                continue
        return counts

    async def shield_enter(
        self, job: str, key: str, digest: str, interval: float, now: float
    ) -> bytes | None:
        """One EVALSHA: GET, or SET PX when absent (`now` is Redis's business here: PX)."""
        call = ScriptCall(
            self._shield_key(job, key, digest),
            [SHIELD_CLAIM.decode(), str(_ttl_milliseconds(interval))],
        )
        entry: Any = await self._calls.call(
            f"shield of {job}/{key}", lambda: run_script(self._client, _SHIELD_ENTER, call)
        )
        if entry is None or isinstance(entry, bytes):
            return entry
        with StoreErrors(f"shield of {job}/{key}"):
            raise ValueError(f"unexpected reply {type(entry).__name__}")

    async def shield_publish(self, job: str, key: str, digest: str, entry: bytes) -> None:
        """SET XX KEEPTTL: the answer lives as long as the claim it replaces would have."""
        name = self._shield_key(job, key, digest)
        await self._calls.call(
            f"shield publish of {job}/{key}",
            lambda: self._client.set(name, entry, xx=True, keepttl=True),
        )

    async def shield_release(self, job: str, key: str, digest: str) -> None:
        call = ScriptCall(self._shield_key(job, key, digest), [SHIELD_CLAIM.decode()])
        await self._calls.call(
            f"shield release of {job}/{key}",
            lambda: run_script(self._client, _SHIELD_RELEASE, call),
        )

    def _shield_key(self, job: str, key: str, digest: str) -> str:
        """Beside the record, in its hash slot, and outside the admin listing's pattern."""
        return f"{self._key_prefix}shield:{{{job}:{key}}}:{digest}"

    @property
    def _audit_key(self) -> str:
        return f"{self._key_prefix}admin:audit"

    @property
    def _counts_key(self) -> str:
        return f"{self._key_prefix}admin:jobs-gauge"

    async def ping(self) -> None:
        await self._calls.call("ping", self._client.ping)

    async def close(self) -> None:
        with StoreErrors(
            "client",
            template="closing the Redis {what} failed: {detail}",
            detail=repr,
            kinds=(RedisError, OSError),
        ):
            await self._client.aclose()

    def _key(self, job: str, key: str) -> str:
        return record_key(self._key_prefix, job, key)
