"""What became of each request: its access line (`logging.access`) and its request metrics
(`metrics.requests`): pollguard_requests_total, pollguard_request_duration_seconds and
pollguard_upstream_duration_seconds.

Runs once per request on the forwarding path, so it does the least it can: a counter found in a
dict, two histogram updates, and — only with the access log on — one LogRecord built directly
(Logger.info would also walk the stack for the caller's file and line, which an access line
never shows).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from time import perf_counter
from typing import Any, NamedTuple

from proxy.client import ClientLink
from proxy.logtext import log_safe
from proxy.loop_metrics import Distribution, Tally
from proxy.metrics import REQUEST_DURATION, REQUESTS, UPSTREAM_DURATION

Scope = dict[str, Any]
ACCESS_LOGGER = logging.getLogger("pollguard.access")
# An access line shows this much of a request target; the rest is cut (and marked). Request
# heads are bounded by server.max_head_size, but a line that long helps no one.
ACCESS_TARGET_CHARS = 2048
NO_RESPONSE = 0  # ClientLink.status before a response head went out
NO_RESPONSE_CODE = "none"  # the code label of a request that got no response

GUARDED = "guarded"
UNGUARDED = "unguarded"
ADMIN = "admin"
WEBSOCKET = "websocket"


class Finished(NamedTuple):
    """One request, as its access line sees it (a NamedTuple: built once per logged request)."""

    kind: str  # GUARDED, UNGUARDED, ADMIN or WEBSOCKET
    client: str  # the peer's address, "-" when the server did not say
    method: str
    target: bytes  # the raw request target, path and query
    status: int  # the status sent (101 for an accepted WebSocket); NO_RESPONSE for none
    sent_bytes: int  # response body bytes handed to the server
    seconds: float  # arrival to the end of the response (or of the handshake)
    upstream_seconds: float | None  # sending upstream to its response head; None: not asked
    request_id: str


class RequestLog:
    """Records finished requests; one per process, built from the config."""

    def __init__(self, *, metrics: bool, access: bool, structured: bool = False) -> None:
        self.metrics = metrics
        self.access = access
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
            self._write(
                Finished(
                    kind,
                    _peer(scope),
                    scope["method"],
                    target,
                    status,
                    client.sent_bytes,
                    seconds,
                    client.upstream_seconds,
                    request_id,
                )
            )

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
            request_id = _header(scope["headers"], b"x-request-id") or "-"
            method = scope.get("method", "GET")
            self._write(
                Finished(
                    kind, _peer(scope), method, target, status, sent_bytes, seconds, None,
                    log_safe(request_id, 64),
                )
            )  # fmt: skip

    def _count(self, kind: str, status: int) -> None:
        series = (kind, status)
        tally = self._tallies.get(series)
        if tally is None:
            code = str(status) if status != NO_RESPONSE else NO_RESPONSE_CODE
            tally = self._tallies[series] = REQUESTS.labels(kind, code)
        tally.value += 1

    def _write(self, request: Finished) -> None:
        if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        target = log_safe(request.target, ACCESS_TARGET_CHARS)
        status = request.status if request.status != NO_RESPONSE else "-"
        upstream = request.upstream_seconds
        upstream_text = f"{upstream:.6f}" if upstream is not None else "-"
        message = (
            f'{request.client} "{request.method} {target}" {status} {request.sent_bytes} '
            f"{request.seconds:.6f} upstream={upstream_text} request_id={request.request_id} "
            f"kind={request.kind}"
        )
        fields: dict[str, Any] | None = None
        if self.structured:
            fields = {
                "client": request.client,
                "method": request.method,
                "path": target,
                "status": request.status if request.status != NO_RESPONSE else None,
                "bytes": request.sent_bytes,
                "duration": round(request.seconds, 6),
                "upstream_duration": round(upstream, 6) if upstream is not None else None,
                "request_id": request.request_id,
                "kind": request.kind,
                "guarded": request.kind == GUARDED,
            }
        ACCESS_LOGGER.handle(AccessRecord(self._record_constants, message, fields))


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
        self, constants: dict[str, Any], message: str, fields: dict[str, Any] | None
    ) -> None:
        created = time.time()
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


def _peer(scope: Scope) -> str:
    peer = scope.get("client")
    return str(peer[0]) if peer else "-"


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for field, value in headers:
        if field == name:
            return value.decode("latin-1")
    return None
