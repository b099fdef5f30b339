"""The HTTP/1.1 server protocol `pollguard serve` runs: uvicorn's httptools protocol, minus one
behaviour a proxy can't live with.

uvicorn (0.54) appends the trailer fields of a chunked request to the very list it hands the app
as `scope["headers"]`, so a request whose body and trailers arrive with its head reaches the app
with the trailers looking like headers (a trailer `Host` became our X-Forwarded-Host). Trailer
fields must never become request headers (RFC 9110 §6.5.1: a recipient must not merge them into
the header section unless it knows that is safe), and pollguard drops them: they are hop-by-hop
for us, since the upstream request is re-framed anyway.

`uvicorn --factory proxy.app:create_app` users get the same with
`--http proxy.server_http:TrailerSafeHttpToolsProtocol` (uvicorn's h11 protocol ignores trailers
already).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PROTOCOL_PATH = "proxy.server_http:TrailerSafeHttpToolsProtocol"


class TrailerSafeHttpToolsProtocol(HttpToolsProtocol):
    def on_header(self, name: bytes, value: bytes) -> None:
        # on_headers_complete sets the scope's method first thing: any field after it is a
        # trailer of a chunked body.
        if "method" in self.scope:
            return
        super().on_header(name, value)
