"""Redis job-state store shared by all replicas.

Layout: one HASH per (job, key) at `<key_prefix>{<job>:<key>}`, e.g. `pollguard:{recording:CA123}`.
The whole `job:key` is the Redis Cluster hash tag, so records spread over slots while anything ever
stored beside a record lands in the same slot (Lua scripts may only touch keys of one slot).
Fields: episode_start, clock_start, window_start, lock_until (floats as `repr`, which round-trips
exactly), attempts, version (decimal ints). The scripts only copy and compare strings, so no value
passes through Lua's number type. Expiry is the key's PEXPIRE, judged by Redis's clock.

Every failure, including garbage in a record, surfaces as StoreUnavailable; deadline, retries
and circuit breaker are in proxy.stores.redis_calls, EVALSHA and NOSCRIPT in redis_scripts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.stores.base import JobState, fresh_state
from proxy.stores.breaker import DEFAULT_COOLDOWN_SECONDS, BreakerState
from proxy.stores.redis_calls import (
    DEFAULT_REFUSED_RETRIES,
    DEFAULT_TIMEOUT_SECONDS,
    RedisCalls,
    redis_answered,
)
from proxy.stores.redis_scripts import ScriptCall, lua_script, run_script, run_script_batch

DEFAULT_KEY_PREFIX = "pollguard:"
MIN_TTL_MILLISECONDS = 1

_FIELDS = ("episode_start", "clock_start", "window_start", "attempts", "lock_until", "version")

# KEYS[1] record; ARGV: fresh field values in _FIELDS order, then the TTL in ms.
_OBSERVE = lua_script("""
local current = redis.call('HMGET', KEYS[1], 'episode_start', 'clock_start', 'window_start',
                           'attempts', 'lock_until', 'version')
if current[6] then
  return current
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[1], 'clock_start', ARGV[2],
           'window_start', ARGV[3], 'attempts', ARGV[4], 'lock_until', ARGV[5], 'version', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
""")

# KEYS[1] record; ARGV: expected version, new field values in _FIELDS order, then the TTL in ms.
_SWAP = lua_script("""
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[2], 'clock_start', ARGV[3],
           'window_start', ARGV[4], 'attempts', ARGV[5], 'lock_until', ARGV[6], 'version', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
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
    ]


def _decode(raw: Sequence[Any]) -> JobState:
    if len(raw) != len(_FIELDS) or any(value is None for value in raw):
        raise ValueError(f"incomplete record {raw!r}")
    text = [value.decode("ascii") if isinstance(value, bytes) else str(value) for value in raw]
    return JobState(
        episode_start=float(text[0]),
        clock_start=float(text[1]),
        window_start=float(text[2]),
        attempts=int(text[3]),
        lock_until=float(text[4]),
        version=int(text[5]),
    )


def _ttl_milliseconds(ttl: float) -> int:
    return max(MIN_TTL_MILLISECONDS, math.ceil(ttl * 1000))


class RedisJobStore:
    """JobStore on Redis; observe and swap are each one atomic Lua round trip (EVALSHA).

    Every call ends within `timeout` and, after a failure, Redis is skipped for
    `breaker_cooldown` (proxy.stores.redis_calls).
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        *,
        breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        refused_retries: int = DEFAULT_REFUSED_RETRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key_prefix = key_prefix
        self._calls = RedisCalls(
            timeout, breaker_cooldown, refused_retries=refused_retries, clock=clock
        )
        try:
            # The pool opens connections lazily and replaces broken ones, so the same store
            # recovers by itself once Redis is back. No socket_timeout: the deadline around each
            # call bounds every read, and redis-py would wrap each send in asyncio.wait_for (a
            # task per command) and each read in a timer of its own. Retries are ours
            # (RedisCalls.retrying), so redis-py's are off.
            self._client: Redis = Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except (RedisError, ValueError) as exc:
            raise StoreUnavailable(f"invalid Redis URL {url!r}: {exc}") from exc
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
        args = [*_encode(fresh_state(now)), str(_ttl_milliseconds(ttl))]
        call = _Observe(
            ScriptCall(self._key(job, key), args), epoch, loop.time(), loop.create_future()
        )
        self._queued.append(call)
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.ensure_future(self._flush_observes())
        try:
            return _decode(await call.result)
        except Exception as exc:
            raise self._calls.unavailable(what, exc) from exc

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
            self._calls.settle(observe.epoch, None)
            if observe.result.done():  # its request was cancelled (client gone)
                continue
            if isinstance(outcome, BaseException):
                observe.result.set_exception(outcome)
            else:
                observe.result.set_result(outcome)

    async def swap(
        self, job: str, key: str, expected_version: int, new: JobState, ttl: float
    ) -> JobState | None:
        stored = JobState(
            episode_start=new.episode_start,
            clock_start=new.clock_start,
            window_start=new.window_start,
            attempts=new.attempts,
            lock_until=new.lock_until,
            version=expected_version + 1,
        )
        args = [str(expected_version), *_encode(stored), str(_ttl_milliseconds(ttl))]
        call = ScriptCall(self._key(job, key), args)
        swapped = await self._calls.call(
            f"swap of {job}/{key}", lambda: run_script(self._client, _SWAP, call)
        )
        return stored if swapped == 1 else None

    async def forget(self, job: str, key: str) -> None:
        record = self._key(job, key)
        await self._calls.call(f"forget of {job}/{key}", lambda: self._client.delete(record))

    async def ping(self) -> None:
        await self._calls.call("ping", self._client.ping)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"closing the Redis client failed: {exc!r}") from exc

    def _key(self, job: str, key: str) -> str:
        return record_key(self._key_prefix, job, key)
