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
_STATUS_LINE = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


class PollguardHttpProtocol(HttpToolsProtocol):
    max_head_size = DEFAULT_MAX_REQUEST_HEAD_SIZE
    max_header_fields = DEFAULT_MAX_REQUEST_HEADER_FIELDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True  # the next bytes belong to a request head
        self._raw_head_bytes = 0  # bytes received while a head was open: bounds the parser
        self._head_bytes = 0  # target and fields parsed so far: the exact bound
        self._head_fields = 0
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_open:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        # httptools holds a partial head in memory: bound it before reading on.
        if self._refused or (self._head_open and self._raw_head_bytes > self.max_head_size):
            self._refuse()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # on_headers_complete sets the scope's method first thing: any field after it is a
        # trailer of a chunked body.
        if "method" in self.scope or self._refused:
            return
        self._head_fields += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._head_fields > self.max_header_fields or self._head_bytes > self.max_head_size:
            self._refused = True  # answered once the parser returns; the app never sees it
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._head_open = False
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._head_open = True
        self._raw_head_bytes = self._head_bytes = self._head_fields = 0

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
