"""asgiproxy as a user would run it: its own `make_app` with the upstream's base URL."""

import os
from typing import cast

from asgiproxy.__main__ import make_app
from starlette.types import ASGIApp


def create_app() -> ASGIApp:
    app, _context = make_app(upstream_base_url=os.environ["BENCH_UPSTREAM_URL"] + "/")
    return cast(ASGIApp, app)  # asgiproxy is untyped
