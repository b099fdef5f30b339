"""A small legacy-backend stand-in with one endpoint per forwarding fidelity point."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

FILE_SIZE = 4 * 1024 * 1024
GZIP_PLAIN = b"pollguard gzip check " * 500
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
ETAG = '"v1-abc"'


def file_bytes(size: int = FILE_SIZE) -> bytes:
    """Deterministic, non-repeating bytes so any misplaced slice is caught."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


class UpstreamState:
    def __init__(self) -> None:
        self.streams_open = 0
        self.streams_closed_early = 0
        self.streams_finished = 0
        self.requests = 0


def create_upstream_app() -> tuple[Starlette, UpstreamState]:
    state = UpstreamState()
    directory = Path(tempfile.mkdtemp(prefix="pollguard-upstream-"))
    big_file = directory / "file.bin"
    big_file.write_bytes(file_bytes())

    async def small(request: Request) -> Response:
        return PlainTextResponse("hello from upstream", headers={"x-upstream": "small"})

    async def gzipped(request: Request) -> Response:
        return Response(
            GZIP_BODY, headers={"content-encoding": "gzip", "content-type": "text/plain"}
        )

    async def cookies(request: Request) -> Response:
        response = PlainTextResponse("two cookies")
        response.set_cookie("a", "1", path="/")
        response.set_cookie("b", "2", path="/")
        return response

    async def login(request: Request) -> Response:
        response = PlainTextResponse("logged in")
        response.set_cookie("session", request.query_params["user"], path="/")
        return response

    async def whoami(request: Request) -> Response:
        return PlainTextResponse(request.headers.get("cookie", ""))

    async def redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"location": "/small"})

    async def etag(request: Request) -> Response:
        if request.headers.get("if-none-match") == ETAG:
            return Response(status_code=304, headers={"etag": ETAG})
        return PlainTextResponse("versioned", headers={"etag": ETAG})

    async def empty(request: Request) -> Response:
        return Response(status_code=204)

    async def status(request: Request) -> Response:
        return PlainTextResponse(
            f"status {request.path_params['code']}", status_code=int(request.path_params["code"])
        )

    async def file(request: Request) -> Response:
        return FileResponse(big_file, media_type="application/octet-stream")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("delay", "5")))
        return PlainTextResponse("finally")

    async def echo(request: Request) -> Response:
        # Read the whole upload first: a StreamingResponse would race request.stream() for
        # receive() messages (Starlette listens for disconnects while streaming).
        body = await request.body()
        framing = "chunked" if "transfer-encoding" in request.headers else "length"
        return Response(body, media_type="application/octet-stream", headers={"x-framing": framing})

    async def headers(request: Request) -> Response:
        return JSONResponse(
            {
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]
                ],
                "raw_path": request.scope["raw_path"].decode("latin-1"),
                "query": request.scope["query_string"].decode("latin-1"),
                "method": request.method,
            }
        )

    async def hop(request: Request) -> Response:
        return PlainTextResponse(
            "hop",
            headers={
                "connection": "x-hop-private",
                "x-hop-private": "secret",
                "keep-alive": "timeout=5",
                "x-end-to-end": "kept",
            },
        )

    async def endless(request: Request) -> Response:
        chunk = b"x" * 65536
        limit = int(request.query_params.get("mib", "1024")) * 16

        async def body() -> AsyncIterator[bytes]:
            state.streams_open += 1
            sent = 0
            try:
                for _ in range(limit):
                    yield chunk
                    sent += 1
                    await asyncio.sleep(0)
                state.streams_finished += 1
            finally:
                state.streams_open -= 1
                if sent < limit:
                    state.streams_closed_early += 1

        return StreamingResponse(body(), media_type="application/octet-stream")

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/small", small, methods=methods),
            Route("/gzip", gzipped),
            Route("/cookies", cookies),
            Route("/login", login),
            Route("/whoami", whoami),
            Route("/redirect", redirect),
            Route("/etag", etag),
            Route("/empty", empty, methods=methods),
            Route("/status/{code:int}", status, methods=methods),
            Route("/file", file),
            Route("/slow", slow),
            Route("/echo", echo, methods=["POST", "PUT"]),
            Route("/headers", headers, methods=methods),
            Route("/headers/{rest:path}", headers, methods=methods),
            Route("/hop", hop),
            Route("/endless", endless),
        ]
    )
    return app, state
