"""What became of each request: its access line (`logging.access`) and its request metrics
(`metrics.requests`): pollguard_requests_total, pollguard_request_duration_seconds and
pollguard_upstream_duration_seconds.

Runs once per request on the forwarding path, so it does the least it can there: one tuple
appended to a batch. Settling a batch updates the series (plain loop_metrics updates) and writes
the access lines: straight into pollguard's own buffered text handler, or as one LogRecord each,
built directly (Logger.info would also walk the stack for the caller's file and line, which an
access line never shows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from time import perf_counter
from typing import Any, TypeGuard

from proxy.client import ClientLink
from proxy.headers import header_value, sane_request_id
from proxy.logformat import BufferedStreamHandler, TextFormatter, rfc3339
from proxy.logtext import log_safe
from proxy.loop_metrics import Distribution, Tally, settle_before_collect
from proxy.metrics import REQUEST_DURATION, REQUESTS, UPSTREAM_DURATION

Scope = dict[str, Any]
ACCESS_LOGGER = logging.getLogger("pollguard.access")
# An access line shows this much of a request target; the rest is cut (and marked). Request
# heads are bounded by server.max_head_size, but a line that long helps no one.
ACCESS_TARGET_CHARS = 2048
# Requests settled at once, at most, and the longest a request waits for its batch (its access
# line for logging, its counts for a scrape under --workers N, whose snapshots are taken each
# second: proxy.metrics_export).
ACCESS_BATCH_LINES = 256
ACCESS_BATCH_SECONDS = 1.0
NO_RESPONSE = 0  # ClientLink.status before a response head went out
NO_RESPONSE_CODE = "none"  # the code label of a request that got no response

GUARDED = "guarded"
UNGUARDED = "unguarded"
ADMIN = "admin"
WEBSOCKET = "websocket"


# One finished request as recorded when it ends: a plain tuple (a NamedTuple's __new__ is Python
# code, ~1k instructions more), read when its batch is settled:
#   kind        GUARDED, UNGUARDED, ADMIN or WEBSOCKET
#   status      the status sent (101 for an accepted WebSocket); NO_RESPONSE for none
#   sent_bytes  response body bytes handed to the server
#   seconds     arrival to the end of the response (or of the handshake)
#   upstream    sending upstream to its response head; None: not asked
#   ended       perf_counter() at the end (the access line's time, once made wall-clock)
#   request_id  as the line shows it; None: "-"
#   peer        the ASGI scope's "client": (host, port), or None when the server did not say
#   method
#   target      the raw request target, path and query
Finished = tuple[
    str, int, int, float, float | None, float, bytes | None, tuple[str, int] | None, str, bytes
]


class RequestLog:
    """Records finished requests; one per process, built from the config.

    With the access log on, a request that ends only joins a batch: one tuple appended. Its
    counts, latencies and access line are made when the batch is settled — when it holds
    ACCESS_BATCH_LINES, a second after its first request, before the registry is read
    (proxy.loop_metrics settles it first, so a scrape sees every request that ended before it),
    and at shutdown. Work done between two
    requests costs several times what the same work costs in a loop (each request's own work
    evicts this code and its data from the CPU caches: a LogRecord measured ~30 µs of CPU per
    line in a running pollguard, ~5 µs in a loop), so batches get the loop's price. With
    `logging.access_buffer: 0` every request is settled as it ends; with metrics alone, each is
    counted as it ends.
    """

    def __init__(
        self, *, metrics: bool, access: bool, structured: bool = False, batched: bool = False
    ) -> None:
        self.metrics = metrics
        self.access = access
        self._batch_limit = ACCESS_BATCH_LINES if batched else 1
        self._pending: list[Finished] = []
        self._timer: asyncio.TimerHandle | None = None
        # logging.format json: each access line also carries its values as fields (they cost
        # ~1 µs a line to attach, and a text line never shows them).
        self.structured = structured
        self._record_constants = _record_constants() if access else {}
        self._tallies: dict[tuple[str, int], Tally] = {}
        self._durations: dict[str, Distribution] = {}
        self._upstream: dict[str, Distribution] = {}
        if metrics:
            # Series for the forwarding kinds from the start: a dashboard shows 0, not nothing.
            for kind in (GUARDED, UNGUARDED):
                self._durations[kind] = REQUEST_DURATION.labels(kind)
                self._upstream[kind] = UPSTREAM_DURATION.labels(kind)
            if access:
                settle_before_collect(self)

    @property
    def enabled(self) -> bool:
        return self.metrics or self.access

    def forwarded(self, client: ClientLink, kind: str, scope: Scope, target: bytes) -> None:
        """A request the forwarder handled (kind GUARDED or UNGUARDED) has ended."""
        ended = perf_counter()
        if not self.access:
            # Metrics alone: three plain updates cost less than a batch entry and its settling
            # (measured ~6k against ~10k instructions).
            self._count(kind, client.status, ended - client.arrived_at, client.upstream_seconds)
            return
        # _hold written out: the forwarding path saves a call.
        pending = self._pending
        pending.append(
            (
                kind, client.status, client.sent_bytes, ended - client.arrived_at,
                client.upstream_seconds, ended, client.request_id, scope.get("client"),
                scope["method"], target,
            )
        )  # fmt: skip
        if len(pending) >= self._batch_limit:
            self.settle()
        elif len(pending) == 1:
            self._timer = client.loop.call_later(ACCESS_BATCH_SECONDS, self.settle)

    def other(
        self, kind: str, scope: Scope, status: int, seconds: float, sent_bytes: int = 0
    ) -> None:
        """An admin request or a WebSocket handshake has ended (status 101: accepted)."""
        if not self.access:
            self._count(kind, status, seconds, None)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if query := scope.get("query_string"):
            target += b"?" + query
        given = header_value(scope["headers"], b"x-request-id")
        # The client's id as the forwarder would keep it; anything else is not shown.
        request_id = given if given is not None and sane_request_id(given) == given else None
        self._hold(
            (
                kind, status, sent_bytes, seconds, None, perf_counter(), request_id,
                scope.get("client"), scope.get("method", "GET"), target,
            )
        )  # fmt: skip

    def _hold(self, request: Finished) -> None:
        """Add `request` to the batch; settle the batch once full, or a second after its first."""
        pending = self._pending
        pending.append(request)
        if len(pending) >= self._batch_limit:
            self.settle()
        elif len(pending) == 1:
            self._timer = asyncio.get_running_loop().call_later(ACCESS_BATCH_SECONDS, self.settle)

    def settle(self) -> None:
        """Count and log every request recorded since the last settle."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._pending
        if not batch:
            return
        self._pending = []
        if self.metrics:
            count = self._count
            for kind, status, _, seconds, upstream, _, _, _, _, _ in batch:
                count(kind, status, seconds, upstream)
        if self.access:
            self._log(batch)

    def flush(self) -> None:
        """Write every access line still held, here and in a buffering handler: at shutdown,
        since uvicorn ends the process by re-raising its SIGTERM, so logging's own exit-time
        flush never runs."""
        self.settle()
        for handler in ACCESS_LOGGER.handlers:
            handler.flush()

    def _count(self, kind: str, status: int, seconds: float, upstream: float | None) -> None:
        tally = self._tallies.get((kind, status))
        if tally is None:
            code = str(status) if status != NO_RESPONSE else NO_RESPONSE_CODE
            tally = self._tallies[(kind, status)] = REQUESTS.labels(kind, code)
        tally.value += 1
        series = self._durations.get(kind)  # latencies: forwarded requests only
        if series is not None:
            series.observe(seconds)
            if upstream is not None:
                self._upstream[kind].observe(upstream)

    def _log(self, batch: list[Finished]) -> None:
        logger = ACCESS_LOGGER
        if not logger.isEnabledFor(logging.INFO):
            return
        # ended (perf_counter) + this: the wall-clock time, as time.time() would have said.
        wall = time.time() - perf_counter()
        handlers = logger.handlers
        if logger.filters or logger.propagate or not _plain(handlers):
            for request in batch:
                logger.handle(self._record(request, wall))
            return
        # What Logger.handle would do for each record — no logger or handler filters, a
        # handler level that lets INFO through, no propagation — with each handler's lock
        # taken once per batch instead of once per line.
        lines: str | None = None
        records: list[AccessRecord] | None = None
        for handler in handlers:
            handler.acquire()
            try:
                if _takes_text_lines(handler):
                    # The handler pollguard installs, formatting as it does: the batch's lines
                    # written as TextFormatter would write them, without a LogRecord each (half
                    # of an access line's cost).
                    if lines is None:
                        lines = _text_lines(batch, logger.name, wall)
                    handler.add_text(lines)
                    continue
                if records is None:
                    records = [self._record(request, wall) for request in batch]
                for record in records:
                    handler.emit(record)
            finally:
                handler.release()

    @staticmethod
    def _message(request: Finished) -> str:
        kind, status, sent_bytes, seconds, upstream, _, rid, peer, method, raw_target = request
        return (
            f'{peer[0] if peer else "-"} "{method} {_logged_target(raw_target)}" '
            f"{status if status != NO_RESPONSE else '-'} {sent_bytes} {seconds:.6f} "
            f"upstream={f'{upstream:.6f}' if upstream is not None else '-'} "
            f"request_id={rid.decode('latin-1') if rid else '-'} kind={kind}"
        )

    def _record(self, request: Finished, wall: float) -> AccessRecord:
        fields: dict[str, Any] | None = None
        if self.structured:
            kind, status, sent_bytes, seconds, upstream, _, rid, peer, method, raw_target = request
            fields = {
                "client": peer[0] if peer else "-",
                "method": method,
                "path": _logged_target(raw_target),
                "status": status if status != NO_RESPONSE else None,
                "bytes": sent_bytes,
                "duration": round(seconds, 6),
                "upstream_duration": round(upstream, 6) if upstream is not None else None,
                "request_id": rid.decode("latin-1") if rid else "-",
                "kind": kind,
                "guarded": kind == GUARDED,
            }
        return AccessRecord(
            self._record_constants, request[5] + wall, self._message(request), fields
        )


class AccessRecord(logging.LogRecord):
    """A LogRecord for one access line, built for less than a third of what LogRecord's own
    __init__ costs (measured ~1.3k vs ~4.3k ns).

    The standard machinery still carries it — Logger.handle, every configured handler, filter
    and formatter — and it has every attribute a LogRecord has, so any format string works. What
    is cheaper: the attributes that are the same for every access line (the logger, level,
    source location, process and thread) are copied from one dict made once per process, where
    LogRecord.__init__ would look each up again (its caller's file, the thread's and process's
    names), and the message comes formatted.
    """

    def __init__(  # LogRecord.__init__ is what this replaces, so it is not called
        self,
        constants: dict[str, Any],
        created: float,
        message: str,
        fields: dict[str, Any] | None,
    ) -> None:
        attributes = self.__dict__
        attributes.update(constants)
        attributes["msg"] = message
        attributes["created"] = created
        attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
        attributes["relativeCreated"] = (created - _LOGGING_STARTED) * 1000
        if fields is not None:
            attributes.update(fields)


# When the logging module was imported: LogRecord.relativeCreated counts from it.
_LOGGING_STARTED: float = getattr(logging, "_startTime", time.time())


def _record_constants() -> dict[str, Any]:
    """The attributes every AccessRecord of this process shares, as LogRecord would set them."""
    thread = threading.current_thread()
    return {
        "name": ACCESS_LOGGER.name,
        "args": (),
        "levelname": logging.getLevelName(logging.INFO),
        "levelno": logging.INFO,
        "pathname": __file__,
        "filename": os.path.basename(__file__),
        "module": __name__.rpartition(".")[2],
        "exc_info": None,
        "exc_text": None,
        "stack_info": None,
        "lineno": 0,
        "funcName": "record",
        "thread": thread.ident,
        "threadName": thread.name,
        "processName": None,
        "process": os.getpid(),
        "taskName": None,
    }


def _plain(handlers: list[logging.Handler]) -> bool:
    """Whether every handler takes every INFO record as it comes (no filters, level ≤ INFO)."""
    return all(not handler.filters and handler.level <= logging.INFO for handler in handlers)


def _logged_target(raw_target: bytes) -> str:
    """The target as an access line shows it: log_safe, and a '"' (which would end the quoted
    request line early and let the rest pose as its fields) written \\x22."""
    target = raw_target.decode("utf-8", "surrogateescape")
    if (
        len(target) <= ACCESS_TARGET_CHARS
        and target.isprintable()
        and "\\" not in target
        and '"' not in target
    ):
        return target  # most targets: log_safe's own fast path, without its call
    return log_safe(raw_target, ACCESS_TARGET_CHARS).replace('"', "\\x22")


def _text_lines(batch: list[Finished], name: str, wall: float) -> str:
    """The batch as TextFormatter would write each line's record (`time LEVEL logger: message`)
    with RequestLog._message's text, written out here: this loop is an access line's whole
    cost (tests/test_request_log.py holds the two to the same bytes)."""
    lines = []
    for kind, status, sent_bytes, seconds, upstream, ended, rid, peer, method, raw_target in batch:
        lines.append(
            f"{rfc3339(ended + wall)} INFO {name}: {peer[0] if peer else '-'} "
            f'"{method} {_logged_target(raw_target)}" '
            f"{status if status != NO_RESPONSE else '-'} {sent_bytes} {seconds:.6f} "
            f"upstream={f'{upstream:.6f}' if upstream is not None else '-'} "
            f"request_id={rid.decode('latin-1') if rid else '-'} kind={kind}\n"
        )
    return "".join(lines)


def _takes_text_lines(handler: logging.Handler) -> TypeGuard[BufferedStreamHandler]:
    """Whether `handler` is pollguard's own buffered one with the text formatter: it takes
    ready lines (BufferedStreamHandler.add_text) and writes exactly what format() would."""
    return (
        type(handler) is BufferedStreamHandler
        and handler.buffer_bytes > 0
        and type(handler.formatter) is TextFormatter
    )
