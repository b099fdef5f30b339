"""What became of each request: its access line (`logging.access`) and its request metrics
(`metrics.requests`): pollguard_requests_total, pollguard_request_duration_seconds and
pollguard_upstream_duration_seconds.

Runs once per request on the forwarding path, so it does the least it can: a counter found in a
dict, two histogram updates, and — only with the access log on — one LogRecord built directly
(Logger.info would also walk the stack for the caller's file and line, which an access line
never shows).
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
from proxy.loop_metrics import Distribution, Tally
from proxy.metrics import REQUEST_DURATION, REQUESTS, UPSTREAM_DURATION

Scope = dict[str, Any]
ACCESS_LOGGER = logging.getLogger("pollguard.access")
# An access line shows this much of a request target; the rest is cut (and marked). Request
# heads are bounded by server.max_head_size, but a line that long helps no one.
ACCESS_TARGET_CHARS = 2048
# Access lines handed to logging at once, at most, and the longest a line waits for its batch.
ACCESS_BATCH_LINES = 256
ACCESS_BATCH_SECONDS = 1.0
NO_RESPONSE = 0  # ClientLink.status before a response head went out
NO_RESPONSE_CODE = "none"  # the code label of a request that got no response

GUARDED = "guarded"
UNGUARDED = "unguarded"
ADMIN = "admin"
WEBSOCKET = "websocket"


# One request, as its access line sees it: a plain tuple, built once per logged request (a
# NamedTuple's __new__ is Python code, ~1k instructions more), unpacked in one place, _line():
#   kind        GUARDED, UNGUARDED, ADMIN or WEBSOCKET
#   client      the peer's address, "-" when the server did not say
#   method
#   target      the raw request target, path and query (bytes)
#   status      the status sent (101 for an accepted WebSocket); NO_RESPONSE for none
#   sent_bytes  response body bytes handed to the server
#   seconds     arrival to the end of the response (or of the handshake)
#   upstream    sending upstream to its response head; None: not asked
#   request_id
#   ended       wall-clock time.time(): the access line's time
Finished = tuple[str, str, str, bytes, int, int, float, float | None, str, float]


class RequestLog:
    """Records finished requests; one per process, built from the config."""

    def __init__(
        self, *, metrics: bool, access: bool, structured: bool = False, batched: bool = False
    ) -> None:
        self.metrics = metrics
        self.access = access
        # logging.access_buffer > 0: lines are handed to logging in batches (see _write).
        self.batched = batched
        self._batch: list[Finished] = []
        self._batch_timer: asyncio.TimerHandle | None = None
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

    @property
    def enabled(self) -> bool:
        return self.metrics or self.access

    def forwarded(self, client: ClientLink, kind: str, scope: Scope, target: bytes) -> None:
        """A request the forwarder handled (kind GUARDED or UNGUARDED) has ended."""
        seconds = perf_counter() - client.arrived_at
        status = client.status
        if self.metrics:
            self._count(kind, status)
            self._durations[kind].observe(seconds)
            if client.upstream_seconds is not None:
                self._upstream[kind].observe(client.upstream_seconds)
        if self.access:
            request_id = client.request_id.decode("latin-1") if client.request_id else "-"
            peer = scope.get("client")
            request: Finished = (
                kind,
                peer[0] if peer else "-",  # the server's host string
                scope["method"],
                target,
                status,
                client.sent_bytes,
                seconds,
                client.upstream_seconds,
                request_id,
                time.time(),
            )
            batch = self._batch
            if self.batched and 0 < len(batch) < ACCESS_BATCH_LINES - 1:
                batch.append(request)  # most requests: _write's work, without the call
            else:
                self._write(request)

    def other(
        self, kind: str, scope: Scope, status: int, seconds: float, sent_bytes: int = 0
    ) -> None:
        """An admin request or a WebSocket handshake has ended (status 101: accepted)."""
        if self.metrics:
            self._count(kind, status)
        if self.access:
            target = scope.get("raw_path") or scope["path"].encode()
            if query := scope.get("query_string"):
                target += b"?" + query
            given = header_value(scope["headers"], b"x-request-id")
            # The client's id as the forwarder would keep it; anything else is not shown.
            sane = given is not None and sane_request_id(given) == given
            request_id = given.decode("ascii") if sane and given is not None else "-"
            method = scope.get("method", "GET")
            self._write(
                (
                    kind, _peer(scope), method, target, status, sent_bytes, seconds, None,
                    request_id, time.time(),
                )
            )  # fmt: skip

    def flush(self) -> None:
        """Write every access line still held, here and in a buffering handler: at shutdown,
        since uvicorn ends the process by re-raising its SIGTERM, so logging's own exit-time
        flush never runs."""
        self._drain()
        for handler in ACCESS_LOGGER.handlers:
            handler.flush()

    def _count(self, kind: str, status: int) -> None:
        tally = self._tallies.get((kind, status))
        if tally is None:
            code = str(status) if status != NO_RESPONSE else NO_RESPONSE_CODE
            tally = self._tallies[(kind, status)] = REQUESTS.labels(kind, code)
        tally.value += 1

    def _write(self, request: Finished) -> None:
        """Batched, a request only joins the batch here; the batch goes to logging when it
        holds ACCESS_BATCH_LINES, or ACCESS_BATCH_SECONDS after its first line. Building and
        formatting a LogRecord between two requests measured ~30 µs of CPU per line in a
        running pollguard (its code and data evicted from the CPU caches by each request's
        work), but ~5 µs a line in a loop; batches get the loop's price."""
        if not self.batched:
            self._emit(request)
            return
        batch = self._batch
        batch.append(request)
        if len(batch) == 1:
            loop = asyncio.get_running_loop()
            self._batch_timer = loop.call_later(ACCESS_BATCH_SECONDS, self._drain)
        elif len(batch) >= ACCESS_BATCH_LINES:
            self._drain()

    def _drain(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, []
        logger = ACCESS_LOGGER
        if not batch or not logger.isEnabledFor(logging.INFO):
            return
        handlers = logger.handlers
        if logger.filters or logger.propagate or not _plain(handlers):
            for request in batch:
                logger.handle(self._record(request))
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
                        lines = _text_lines(batch, logger.name)
                    handler.add_text(lines)
                    continue
                if records is None:
                    records = [self._record(request) for request in batch]
                for record in records:
                    handler.emit(record)
            finally:
                handler.release()

    def _emit(self, request: Finished) -> None:
        if ACCESS_LOGGER.isEnabledFor(logging.INFO):
            ACCESS_LOGGER.handle(self._record(request))

    @staticmethod
    def _message(request: Finished) -> str:
        kind, client, method, raw_target, status, sent_bytes, seconds, upstream, request_id, _ = (
            request
        )
        return (
            f'{client} "{method} {_logged_target(raw_target)}" '
            f"{status if status != NO_RESPONSE else '-'} {sent_bytes} {seconds:.6f} "
            f"upstream={f'{upstream:.6f}' if upstream is not None else '-'} "
            f"request_id={request_id} kind={kind}"
        )

    def _record(self, request: Finished) -> AccessRecord:
        fields: dict[str, Any] | None = None
        if self.structured:
            kind, client, method, raw_target, status, sent_bytes, seconds, upstream, rid, _ = (
                request
            )
            fields = {
                "client": client,
                "method": method,
                "path": _logged_target(raw_target),
                "status": status if status != NO_RESPONSE else None,
                "bytes": sent_bytes,
                "duration": round(seconds, 6),
                "upstream_duration": round(upstream, 6) if upstream is not None else None,
                "request_id": rid,
                "kind": kind,
                "guarded": kind == GUARDED,
            }
        return AccessRecord(self._record_constants, request[9], self._message(request), fields)


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


def _text_lines(batch: list[Finished], name: str) -> str:
    """The batch as TextFormatter would write each line's record (`time LEVEL logger: message`)
    with RequestLog._message's text, written out here: this loop is an access line's whole
    cost (tests/test_request_log.py holds the two to the same bytes)."""
    lines = []
    for (
        kind,
        client,
        method,
        raw_target,
        status,
        sent_bytes,
        seconds,
        upstream,
        rid,
        ended,
    ) in batch:
        lines.append(
            f'{rfc3339(ended)} INFO {name}: {client} "{method} {_logged_target(raw_target)}" '
            f"{status if status != NO_RESPONSE else '-'} {sent_bytes} {seconds:.6f} "
            f"upstream={f'{upstream:.6f}' if upstream is not None else '-'} "
            f"request_id={rid} kind={kind}\n"
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


def _peer(scope: Scope) -> str:
    peer = scope.get("client")
    return str(peer[0]) if peer else "-"
