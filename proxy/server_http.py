"""The HTTP/1.1 server protocol `pollguard serve` runs: uvicorn's httptools protocol with two
things a proxy can't do without.

1. Bounded request heads. uvicorn's httptools protocol accepts a head of any size (a 1 MB Cookie
   line, 500 Cookie lines of 8 KB: all accepted, and all forwarded). Here a head larger than
   `server.max_head_size`, or with more than `server.max_header_fields` fields, is answered
   `431` problem+json and the connection closed, before the app sees it.
2. No trailer fields as headers. uvicorn (0.54) appends the trailer fields of a chunked request
   to the very list it hands the app as `scope["headers"]`, so a request whose body and
   trailers arrive with its head reaches the app with the trailers looking like headers (a
   trailer `Host` became our X-Forwarded-Host). Trailer fields must not be merged into the
   header section (RFC 9110 §6.5.1); pollguard drops them — the upstream request is re-framed
   anyway.

`uvicorn --factory proxy.app:create_app` users get the same with
`--http proxy.server_http:PollguardHttpProtocol`. The limits are set per process by the app
factory (`configure`), which runs in every worker before it serves.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import DEFAULT_MAX_REQUEST_HEAD_SIZE, DEFAULT_MAX_REQUEST_HEADER_FIELDS
from proxy.headers import new_request_id
from proxy.problems import Problem

logger = logging.getLogger("pollguard.server")

PROTOCOL_PATH = "proxy.server_http:PollguardHttpProtocol"


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a request head over its bounds."""


_STATUS_LINE = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


class PollguardHttpProtocol(HttpToolsProtocol):
    max_head_size = DEFAULT_MAX_REQUEST_HEAD_SIZE
    max_header_fields = DEFAULT_MAX_REQUEST_HEADER_FIELDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes received while a request head was open: an upper bound of the head's size, so
        # the exact size is only worth computing when this exceeds the limit.
        self._head_bytes = 0
        self._refused = False

    # Two overrides, kept to the bone: they run for every request (each costs ~3k instructions).
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        cycle = self.cycle
        head_open = cycle is None or not cycle.more_body  # no request, or its body is complete
        if head_open:
            self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        # httptools holds a partial head in memory: bound it before reading on.
        if self._refused or (
            head_open and self.cycle is cycle and self._head_bytes > self.max_head_size
        ):
            self._refuse()

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.max_header_fields or (
            self._head_bytes > self.max_head_size and self._exact_head_size() > self.max_head_size
        ):
            # The app never sees it. Raising stops the parser (its further callbacks would reach
            # the previous request's cycle); uvicorn then answers a parse error with
            # send_400_response, which answers 431 for us.
            self._refused = True
            raise _HeadTooLarge
        self._head_bytes = 0
        HttpToolsProtocol.on_headers_complete(self)
        if "path" in self.scope:  # a request for the app (not a WebSocket upgrade)
            # uvicorn's on_header appends to self.headers, which is scope["headers"]: give it
            # a list of its own, so the trailer fields of a chunked body go nowhere.
            self.headers = []

    def _exact_head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        logger.warning(
            "request head from %s over %d bytes or %d fields; answered 431",
            client,
            self.max_head_size,
            self.max_header_fields,
        )
        request_id = new_request_id()
        problem = Problem(
            431,
            "request-head-too-large",
            f"request head larger than {self.max_head_size} bytes or with more than "
            f"{self.max_header_fields} fields",
        )
        body = problem.body(request_id.decode())
        head = [_STATUS_LINE]
        for name, value in [*problem.headers(body, request_id), (b"connection", b"close")]:
            head += (name, b": ", value, b"\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


def configure(max_head_size: int, max_header_fields: int) -> None:
    """Set this process's request-head bounds (config `server.max_head_size/_header_fields`)."""
    PollguardHttpProtocol.max_head_size = max_head_size
    PollguardHttpProtocol.max_header_fields = max_header_fields
