"""asgiproxy as a user would run it: its own `make_app` with the upstream's base URL, except for
one limit. aiohttp's default connector holds at most 100 upstream connections, and a proxied
WebSocket holds one for its whole life: the 101st WebSocket waited forever for a free one. The
connector is unlimited here, as pollguard's WebSockets are; the HTTP load (32 connections) never
reaches either limit, so its rows do not change."""

import os
from typing import cast
from urllib.parse import urlparse

import aiohttp
from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
from asgiproxy.context import ProxyContext
from asgiproxy.simple_proxy import make_simple_proxy_app
from starlette.types import ASGIApp


class UnlimitedProxyContext(ProxyContext):
    @property
    def session(self) -> aiohttp.ClientSession:
        if not self._session:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session


def create_app() -> ASGIApp:
    # asgiproxy.__main__.make_app, with the context above.
    upstream_base_url = os.environ["BENCH_UPSTREAM_URL"] + "/"
    config = type(
        "Config",
        (BaseURLProxyConfigMixin, ProxyConfig),
        {
            "upstream_base_url": upstream_base_url,
            "rewrite_host_header": urlparse(upstream_base_url).netloc,
        },
    )()
    return cast(ASGIApp, make_simple_proxy_app(UnlimitedProxyContext(config)))  # untyped
