"""fastapi-proxy-lib as its README shows it: the reverse HTTP proxy (default httpx client) and,
on the same app, its reverse WebSocket proxy (httpx-ws), registered with its `RouterHelper` as
`reverse_http_app` and `reverse_ws_app` each register theirs. HTTP requests never reach the
WebSocket route (Starlette matches routes by scope type).

One limit is lifted: httpx's default pool holds at most 100 connections, and a proxied WebSocket
holds one for its whole life, so the 101st WebSocket was refused (PoolTimeout after 5 s). The
WebSocket proxy's own client is unlimited, as pollguard's WebSockets are; the HTTP proxy keeps
the default client."""

import os

import httpx
from fastapi import FastAPI
from fastapi_proxy_lib.core.http import ReverseHttpProxy
from fastapi_proxy_lib.core.websocket import ReverseWebSocketProxy
from fastapi_proxy_lib.fastapi.router import RouterHelper


def create_app() -> FastAPI:
    base_url = os.environ["BENCH_UPSTREAM_URL"] + "/"
    ws_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
    helper = RouterHelper()
    http_router = helper.register_router(ReverseHttpProxy(base_url=base_url))
    ws_base_url = "ws://" + base_url.removeprefix("http://")
    ws_router = helper.register_router(ReverseWebSocketProxy(ws_client, base_url=ws_base_url))
    app = FastAPI(lifespan=helper.get_lifespan())
    app.include_router(http_router)
    app.include_router(ws_router)
    return app
