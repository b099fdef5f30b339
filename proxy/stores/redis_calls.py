"""What surrounds every Redis call: the circuit breaker, the deadline, retries, error translation.

- **Deadline.** A call (retries, a NOSCRIPT reload and pool waits included) ends within
  `state.timeout`: the store runs it under `asyncio.timeout`. On main, redis-py's socket timeout
  applied per read and was retried twice, so a frozen Redis cost 3 × 250 ms per call.
  Cancelling a redis-py call mid-reply is safe: redis-py 8 disconnects a connection whose read or
  write was interrupted by any BaseException, so no pooled connection keeps an unread reply
  (`Connection.read_response`/`send_packed_command`; tests/adversarial/test_store_outage.py).
- **Retries.** Only a refused connection is retried: nothing was sent, so nothing can run
  twice, and it fails in microseconds. A timeout is never retried: the deadline is spent.
- **Breaker** (`proxy.stores.breaker`). After a failed call Redis is skipped for
  `state.breaker_cooldown`; skipped calls raise StoreUnavailable at once, which the guard turns
  into the `state.on_error` answer. One log line when it opens, one when Redis answers again.
- **Translation.** Every failure leaves the store as StoreUnavailable. Redis error replies and
  records we can't read prove that Redis answered, so they don't open the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.errors import StoreUnavailable
from proxy.metrics import STORE_BREAKER_OPEN, STORE_BREAKER_OPENINGS, STORE_SKIPPED
from proxy.stores.breaker import (
    CLOSED,
    DEFAULT_COOLDOWN_SECONDS,
    BreakerState,
    Phase,
    admit,
    settle,
)

logger = logging.getLogger("pollguard.store")

DEFAULT_TIMEOUT_SECONDS = 0.25
DEFAULT_REFUSED_RETRIES = 2
# Redis restarting refuses connections for a moment; two quick retries (10 ms, then 20 ms) ride
# out a blip without eating much of a 250 ms deadline.
REFUSED_BACKOFF_SECONDS = 0.01

Result = TypeVar("Result")


def is_refused(exc: BaseException) -> bool:
    """A connection Redis refused: redis-py raises ConnectionError with the OSError as context."""
    return isinstance(exc, RedisConnectionError) and isinstance(
        exc.__cause__ or exc.__context__, ConnectionRefusedError
    )


def redis_answered(exc: BaseException) -> bool:
    """An error that proves Redis is up: an error reply, or a reply we could not read."""
    return isinstance(exc, ResponseError | ValueError | UnicodeError)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # asyncio.timeout's; redis-py's has a message
        return "no answer within the deadline"
    return f"{type(exc).__name__}: {exc}"


_FAILED = "Redis {what} failed: {detail}"


class StoreErrors:
    """The one place where Redis failures become StoreUnavailable, as httpx's
    map_httpcore_exceptions: `with StoreErrors("swap of job/key"):` raises StoreUnavailable
    ("Redis swap of job/key failed: <detail>") from any of `kinds` raised inside; a
    StoreUnavailable passes as it is, and so do cancellation and everything not in `kinds`.
    A class with __slots__, not a @contextmanager generator: observe and swap run on guarded
    polls, and a generator-based context manager costs a generator and two more frames each."""

    __slots__ = ("_detail", "_kinds", "_template", "_what")

    def __init__(
        self,
        what: str,
        *,
        template: str = _FAILED,
        detail: Callable[[BaseException], str] = describe,
        kinds: tuple[type[Exception], ...] = (Exception,),
    ) -> None:
        self._what = what
        self._template = template  # formatted with {what} and {detail}
        self._detail = detail
        self._kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, StoreUnavailable) or not isinstance(exc, self._kinds):
            return
        message = self._template.format(what=self._what, detail=self._detail(exc))
        raise StoreUnavailable(message) from exc


class RedisCalls:
    """The breaker state and policy shared by one store's calls; see the module docstring."""

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        *,
        refused_retries: int = DEFAULT_REFUSED_RETRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.breaker_cooldown = breaker_cooldown
        self._refused_retries = refused_retries
        self._clock = clock
        self._breaker: BreakerState = CLOSED
        self._opened_at = 0.0

    @property
    def breaker(self) -> BreakerState:
        return self._breaker

    def admit(self, what: str) -> int:
        """The breaker epoch to settle the call with; StoreUnavailable at once when skipped."""
        now = self._clock()
        admission = admit(self._breaker, now, self.timeout)
        self._breaker = admission.state
        if not admission.allowed:
            STORE_SKIPPED.inc()
            raise StoreUnavailable(
                f"Redis {what} skipped: unreachable for {now - self._opened_at:.1f}s, "
                f"next try in {max(0.0, self._breaker.until - now):.1f}s"
            )
        return admission.epoch

    def settle(self, epoch: int, error: BaseException | None) -> None:
        """Record how a call admitted in `epoch` ended; a cancelled call records nothing."""
        if error is not None and not isinstance(error, Exception):
            return  # cancelled: no verdict on Redis (a lost probe is replaced after timeout)
        succeeded = error is None or redis_answered(error)
        before = self._breaker
        now = self._clock()
        after = settle(before, epoch, succeeded, now, self.breaker_cooldown)
        if after is before:
            return
        self._breaker = after
        if before.phase is Phase.CLOSED and error is not None:
            self._opened_at = now
            STORE_BREAKER_OPENINGS.inc()
            STORE_BREAKER_OPEN.set(1)
            logger.warning(
                "Redis unreachable (%s): skipping it for %gs at a time, guarded requests get "
                "the state.on_error answer until it answers again",
                describe(error),
                self.breaker_cooldown,
            )
        elif after.phase is Phase.CLOSED:
            STORE_BREAKER_OPEN.set(0)
            logger.warning(
                "Redis answers again after %.1fs; guarding resumes", now - self._opened_at
            )

    async def call(self, what: str, command: Callable[[], Awaitable[Result]]) -> Result:
        """Run one Redis command under the breaker and the deadline; failures → StoreUnavailable."""
        epoch = self.admit(what)
        with StoreErrors(what):
            try:
                async with asyncio.timeout(self.timeout):
                    result = await self.retrying(command)
            except BaseException as exc:
                self.settle(epoch, exc)  # the breaker judges the error itself, untranslated
                raise
        self.settle(epoch, None)
        return result

    async def retrying(self, command: Callable[[], Awaitable[Result]]) -> Result:
        """`command`, again after a refused connection (at most `refused_retries` times)."""
        attempt = 0
        while True:
            try:
                return await command()
            except RedisConnectionError as exc:
                if attempt >= self._refused_retries or not is_refused(exc):
                    raise
            await asyncio.sleep(REFUSED_BACKOFF_SECONDS * 2**attempt)
            attempt += 1
