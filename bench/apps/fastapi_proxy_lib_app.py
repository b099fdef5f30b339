"""fastapi-proxy-lib as its README shows it: `reverse_http_app` with default httpx client."""

import os

from fastapi import FastAPI
from fastapi_proxy_lib.fastapi.app import reverse_http_app


def create_app() -> FastAPI:
    return reverse_http_app(base_url=os.environ["BENCH_UPSTREAM_URL"] + "/")
