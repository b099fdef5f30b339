"""Redis job-state store shared by all replicas.

Layout: one HASH per (job, key) at `<key_prefix>{<job>:<key>}`, e.g. `pollguard:{recording:CA123}`.
The whole `job:key` is the Redis Cluster hash tag, so records spread over slots while anything ever
stored beside a record lands in the same slot (Lua scripts may only touch keys of one slot).
Fields: episode_start, clock_start, window_start, lock_until (floats as `repr`, which round-trips
exactly), attempts, version (decimal ints). The scripts only copy and compare strings, so no value
passes through Lua's number type. Expiry is the key's PEXPIRE, judged by Redis's clock.

Every failure, including garbage in a record, surfaces as StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import StoreUnavailable
from proxy.stores.base import JobState, fresh_state

DEFAULT_KEY_PREFIX = "pollguard:"
DEFAULT_TIMEOUT_SECONDS = 0.25
DEFAULT_RETRIES = 2
# Short backoff: a request is waiting on us, and a dead Redis must fail fast (well under a second).
RETRY_BACKOFF_BASE_SECONDS = 0.01
RETRY_BACKOFF_CAP_SECONDS = 0.1
MIN_TTL_MILLISECONDS = 1

_FIELDS = ("episode_start", "clock_start", "window_start", "attempts", "lock_until", "version")

# KEYS[1] record; ARGV: fresh field values in _FIELDS order, then the TTL in ms.
_OBSERVE_LUA = """
local current = redis.call('HMGET', KEYS[1], 'episode_start', 'clock_start', 'window_start',
                           'attempts', 'lock_until', 'version')
if current[6] then
  return current
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[1], 'clock_start', ARGV[2],
           'window_start', ARGV[3], 'attempts', ARGV[4], 'lock_until', ARGV[5], 'version', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
"""

# KEYS[1] record; ARGV: expected version, new field values in _FIELDS order, then the TTL in ms.
_SWAP_LUA = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'episode_start', ARGV[2], 'clock_start', ARGV[3],
           'window_start', ARGV[4], 'attempts', ARGV[5], 'lock_until', ARGV[6], 'version', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
"""


@dataclass(slots=True)
class _Observe:
    key: str
    args: list[str]
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
    """JobStore on Redis; observe and swap are each one atomic Lua round trip (EVALSHA)."""

    def __init__(
        self,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        *,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self._key_prefix = key_prefix
        retry = Retry(
            ExponentialBackoff(cap=RETRY_BACKOFF_CAP_SECONDS, base=RETRY_BACKOFF_BASE_SECONDS),
            retries,
            supported_errors=(RedisConnectionError, RedisTimeoutError),
        )
        try:
            # The pool opens connections lazily and replaces broken ones, so the same store
            # recovers by itself once Redis is back.
            self._client: Redis = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=retry,
            )
        except (RedisError, ValueError) as exc:
            raise StoreUnavailable(f"invalid Redis URL {url!r}: {exc}") from exc
        self._queued: list[_Observe] = []
        self._flushing = False
        self._flusher: asyncio.Future[None] | None = None
        self._observe_script = self._client.register_script(_OBSERVE_LUA)
        self._swap_script = self._client.register_script(_SWAP_LUA)

    async def observe(self, job: str, key: str, now: float, ttl: float) -> JobState:
        """One EVALSHA. Observes that arrive while another is in flight wait for it and then
        go out together in one pipeline (auto-pipelining): under load a replica pays one
        round trip, one pool checkout and one write per batch instead of per poll."""
        args = [*_encode(fresh_state(now)), str(_ttl_milliseconds(ttl))]
        call = _Observe(self._key(job, key), args, asyncio.get_running_loop().create_future())
        self._queued.append(call)
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.ensure_future(self._flush_observes())
        try:
            raw = await call.result
            return _decode(raw)
        except (RedisError, OSError, ValueError, UnicodeError) as exc:
            raise StoreUnavailable(f"Redis observe of {job}/{key} failed: {exc!r}") from exc

    async def _flush_observes(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                await self._run_observes(batch)
        finally:
            self._flushing = False

    async def _run_observes(self, batch: list[_Observe]) -> None:
        try:
            if len(batch) == 1:  # a one-command pipeline costs more than a plain call
                results: list[Any] = [
                    await self._observe_script(keys=[batch[0].key], args=batch[0].args)
                ]
            else:
                pipe = self._client.pipeline(transaction=False)
                for call in batch:
                    await self._observe_script(keys=[call.key], args=call.args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for call in batch:
                if call.result.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    call.result.cancel()
                else:
                    call.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for call, outcome in zip(batch, results, strict=True):
            if call.result.done():  # its request was cancelled (client gone)
                continue
            if isinstance(outcome, BaseException):
                call.result.set_exception(outcome)
            else:
                call.result.set_result(outcome)

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
        try:
            swapped = await self._swap_script(keys=[self._key(job, key)], args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis swap of {job}/{key} failed: {exc!r}") from exc
        return stored if swapped == 1 else None

    async def forget(self, job: str, key: str) -> None:
        try:
            await self._client.delete(self._key(job, key))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis forget of {job}/{key} failed: {exc!r}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis ping failed: {exc!r}") from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"closing the Redis client failed: {exc!r}") from exc

    def _key(self, job: str, key: str) -> str:
        return record_key(self._key_prefix, job, key)
