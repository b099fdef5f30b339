"""TLS on both sides, end to end: real uvicorn upstreams serving HTTPS with certificates made for
this run (tests/pki.py), pollguard as a `pollguard serve` process, clients trusting the private
CA; and the TLS pieces in-process (the re-prepare's SNI, failures told apart from stale
connections)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import UpstreamUnavailable
from proxy.reprepare import Repreparer, ReprepareRequest
from proxy.tls import client_context, describe_tls_error, is_tls_failure
from proxy.upstream import Upstream, UpstreamSettings
from proxy.upstream_connection import ConnectionLimits, StaleConnection, UpstreamConnection
from tests.job_upstream import RECORDING, JobBackend, guard_config
from tests.pki import UPSTREAM_NAME, KeyPair, Pki
from tests.servers import ThreadedServer, running_proxy
from tests.upstream_app import file_bytes

BODY = file_bytes(256 * 1024)
CALL = "CA" + "1" * 32
VERIFY_FALSE_WARNING = "upstream.tls.verify is false"


def _upstream_app() -> Starlette:
    async def body(request: Request) -> Response:
        return Response(BODY, media_type="application/octet-stream")

    async def echo(request: Request) -> Response:
        return JSONResponse(dict(request.headers))

    return Starlette(routes=[Route("/bytes", body), Route("/echo", echo)])


@contextmanager
def https_upstream(
    pair: KeyPair,
    *,
    app: Any = None,
    client_ca: str | None = None,
    names: list[str | None] | None = None,
) -> Iterator[ThreadedServer]:
    """uvicorn serving HTTPS with `pair`; with `client_ca`, only to clients holding a certificate
    it issued; every handshake's SNI name (None: none sent) appended to `names`."""
    options: dict[str, Any] = {"ssl_certfile": pair.cert_file, "ssl_keyfile": pair.key_file}
    if client_ca is not None:
        options |= {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    server = ThreadedServer(app or _upstream_app(), **options)
    if names is not None:
        server.config.load()  # builds config.ssl, which the server thread then uses as it is
        assert server.config.ssl is not None
        server.config.ssl.sni_callback = lambda _sock, name, _ctx: names.append(name)
    with server:
        yield server


def pollguard_config(upstream_url: str, **tls: object) -> dict[str, Any]:
    return {
        "upstream": {
            "url": upstream_url,
            "connect_timeout": "2s",
            "read_timeout": "5s",
            "tls": tls,
        }
    }


def listening_tls(pki: Pki, *, client_ca: str | None = None) -> dict[str, Any]:
    tls = {"cert_file": pki.proxy.cert_file, "key_file": pki.proxy.key_file}
    return {"tls": tls if client_ca is None else {**tls, "ca_file": client_ca}}


def test_https_client_through_pollguard_to_an_https_upstream_with_a_private_ca(pki: Pki) -> None:
    """HTTPS in and out with a private CA: the body arrives byte-exact, the upstream is told X-Forwarded-Proto: https, /-/ready does the TLS handshake, and no access log is written."""
    with https_upstream(pki.upstream) as upstream:
        config = {
            **pollguard_config(upstream.url, ca_file=pki.ca_file),
            "server": listening_tls(pki),
        }
        with (
            running_proxy(config, client_tls=pki.client_context()) as proxy,
            httpx.Client(base_url=proxy.url, verify=pki.client_context(), timeout=5) as client,
        ):
            assert proxy.url.startswith("https://")
            response = client.get("/bytes")
            echoed = client.get("/echo", headers={"x-forwarded-proto": "http"}).json()
            ready = client.get("/-/ready")
            logs = proxy.logs()
    assert response.status_code == 200
    assert response.content == BODY
    assert response.headers.get_list("server") == ["uvicorn"]  # the upstream's, and only it
    assert echoed["x-forwarded-proto"] == "https"
    assert echoed["host"] == f"127.0.0.1:{upstream.port}"
    assert ready.status_code == 200
    assert '"GET /bytes HTTP/1.1" 200' not in logs


def test_wrong_ca_is_502_naming_the_certificate_error(pki: Pki) -> None:
    """An upstream certificate the configured CA did not issue: 502 upstream-unavailable whose detail names the verification error, one handshake (no retry), and /-/ready 503 saying why."""
    names: list[str | None] = []
    with (
        https_upstream(pki.upstream, names=names) as upstream,
        running_proxy(pollguard_config(upstream.url, ca_file=pki.other_ca_file)) as proxy,
    ):
        response = httpx.get(proxy.url + "/bytes", timeout=5)
        handshakes = len(names)
        ready = httpx.get(proxy.url + "/-/ready", timeout=5)
    assert response.status_code == 502
    problem = response.json()
    assert problem["code"] == "upstream-unavailable"
    assert problem["detail"] == (
        f"TLS handshake with 127.0.0.1:{upstream.port} failed: certificate verify failed: "
        "unable to get local issuer certificate"
    )
    assert response.headers["retry-after"] == "5"
    assert handshakes == 1
    assert ready.status_code == 503
    assert "unable to get local issuer certificate" in ready.json()["detail"]


def test_server_name_is_sent_as_sni_and_verified(pki: Pki) -> None:
    """An upstream reached by IP whose certificate names only upstream.test: refused as a mismatch by default, served with upstream.tls.server_name, which is also the SNI sent."""
    names: list[str | None] = []
    with https_upstream(pki.named_upstream, names=names) as upstream:
        with running_proxy(pollguard_config(upstream.url, ca_file=pki.ca_file)) as proxy:
            mismatch = httpx.get(proxy.url + "/bytes", timeout=5)
        names.clear()
        config = pollguard_config(upstream.url, ca_file=pki.ca_file, server_name=UPSTREAM_NAME)
        with running_proxy(config) as proxy:
            served = httpx.get(proxy.url + "/bytes", timeout=5)
            ready = httpx.get(proxy.url + "/-/ready", timeout=5)
            echoed = httpx.get(proxy.url + "/echo", timeout=5).json()
    assert mismatch.status_code == 502
    assert mismatch.json()["code"] == "upstream-unavailable"
    assert "certificate verify failed: IP address mismatch" in mismatch.json()["detail"]
    assert served.status_code == 200 and served.content == BODY
    assert ready.status_code == 200
    assert names and set(names) == {UPSTREAM_NAME}
    assert echoed["host"] == f"127.0.0.1:{upstream.port}"  # Host stays the URL's
    assert echoed["x-forwarded-proto"] == "http"  # pollguard itself listens without TLS here


def test_verify_false_accepts_any_certificate_and_warns_once(pki: Pki) -> None:
    """upstream.tls.verify: false serves from an upstream no trusted CA vouches for, and says so once at startup."""
    with (
        https_upstream(pki.upstream) as upstream,
        running_proxy(pollguard_config(upstream.url, verify=False)) as proxy,
    ):
        response = httpx.get(proxy.url + "/bytes", timeout=5)
        logs = proxy.logs()
    assert response.status_code == 200 and response.content == BODY
    assert logs.count(VERIFY_FALSE_WARNING) == 1
    assert "WARNING" in next(line for line in logs.splitlines() if VERIFY_FALSE_WARNING in line)


def test_upstream_requiring_a_client_certificate(pki: Pki) -> None:
    """An mTLS upstream: without upstream.tls.cert_file/key_file 502 upstream-unavailable, with them 200."""
    with https_upstream(pki.upstream, client_ca=pki.ca_file) as upstream:
        with running_proxy(pollguard_config(upstream.url, ca_file=pki.ca_file)) as proxy:
            refused = httpx.get(proxy.url + "/bytes", timeout=5)
        config = pollguard_config(
            upstream.url,
            ca_file=pki.ca_file,
            cert_file=pki.client.cert_file,
            key_file=pki.client.key_file,
        )
        with running_proxy(config) as proxy:
            served = httpx.get(proxy.url + "/bytes", timeout=5)
    assert refused.status_code == 502
    assert refused.json()["code"] == "upstream-unavailable"
    # uvicorn closes without the TLS alert that would name the reason: pollguard hints at it.
    assert "client certificate" in refused.json()["detail"]
    assert served.status_code == 200 and served.content == BODY


class AlertingUpstream:
    """A TLS server requiring a client certificate that, refusing one, sends the TLS alert and
    keeps the socket open until the client closes (so the alert is read, not raced by a reset)."""

    def __init__(self, pair: KeyPair, client_ca: str) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(pair.cert_file, pair.key_file)
        self._context.load_verify_locations(client_ca)
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.refused = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            conn.settimeout(5)
            tls = self._context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError):
                self.refused += 1
                with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                    try:
                        while raw.recv(65536):
                            pass
                    except OSError:
                        pass
            finally:
                tls.close()

    def __enter__(self) -> AlertingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown, not close alone, wakes the thread blocked in accept() (Linux: EINVAL).
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


def test_client_certificate_refusal_is_named(pki: Pki) -> None:
    """An upstream that refuses pollguard for want of a client certificate, with a TLS alert: 502 upstream-unavailable naming the alert."""
    with (
        AlertingUpstream(pki.upstream, pki.ca_file) as upstream,
        running_proxy(pollguard_config(upstream.url, ca_file=pki.ca_file)) as proxy,
    ):
        response = httpx.get(proxy.url + "/bytes", timeout=5)
    assert response.status_code == 502
    problem = response.json()
    assert problem["code"] == "upstream-unavailable"
    assert "certificate required" in problem["detail"]
    assert problem["detail"].startswith(f"TLS error from upstream 127.0.0.1:{upstream.port}: ")
    assert upstream.refused == 1  # not retried as a stale connection


def test_listening_ca_file_requires_client_certificates(pki: Pki) -> None:
    """server.tls.ca_file: a client without a certificate that CA issued is refused at the handshake; one with it is served."""
    with https_upstream(pki.upstream) as upstream:
        config = {
            **pollguard_config(upstream.url, ca_file=pki.ca_file),
            "server": listening_tls(pki, client_ca=pki.ca_file),
        }
        with running_proxy(config, client_tls=pki.client_context(with_cert=True)) as proxy:
            with httpx.Client(verify=pki.client_context(with_cert=True), timeout=5) as client:
                served = client.get(proxy.url + "/bytes")
            with (
                httpx.Client(verify=pki.client_context(), timeout=5) as client,
                pytest.raises(httpx.TransportError),
            ):
                client.get(proxy.url + "/bytes")
    assert served.status_code == 200 and served.content == BODY


def test_reprepare_goes_over_https_with_the_private_ca_and_server_name(pki: Pki) -> None:
    """A stuck job behind an HTTPS upstream (private CA, reached by IP, certificate for upstream.test): the forced re-prepare verifies the same name, so the job is re-prepared and served."""
    jobs = JobBackend()
    names: list[str | None] = []
    with https_upstream(pki.named_upstream, app=jobs.app(), names=names) as upstream:
        config = guard_config(upstream.url)
        config["upstream"]["tls"] = {"ca_file": pki.ca_file, "server_name": UPSTREAM_NAME}  # type: ignore[index]
        url = f"/api/recordings/file/{CALL}"
        with running_proxy(config) as proxy, httpx.Client(base_url=proxy.url, timeout=5) as client:
            deadline = time.monotonic() + 10
            response = client.get(url)
            while response.status_code == 202 and time.monotonic() < deadline:
                time.sleep(0.1)  # the poll interval of a player; the guard's clock is real
                response = client.get(url)
    assert response.status_code == 200 and response.content == RECORDING
    assert jobs.prepares[CALL] == 1
    assert set(names) == {UPSTREAM_NAME}


# In-process -------------------------------------------------------------------------------------


def _prepare_spec() -> ReprepareRequest:
    return ReprepareRequest(
        method="POST",
        path="/api/recordings/{call_sid}/prepare",
        query={"force": "1"},
        headers={},
        forward_headers=(),
        timeout=3.0,
    )


@pytest.mark.anyio
async def test_repreparer_verifies_and_sends_the_server_name(pki: Pki) -> None:
    """Repreparer with server_hostname sends it as SNI and accepts a certificate for it; without it, the same upstream reached by IP fails as a hostname mismatch."""
    jobs = JobBackend()
    names: list[str | None] = []
    context = client_context(ca_file=pki.ca_file)
    with https_upstream(pki.named_upstream, app=jobs.app(), names=names) as upstream:
        results = []
        for server_hostname in (UPSTREAM_NAME, None):
            repreparer = Repreparer(
                upstream.url,
                connect_timeout=2,
                ssl_context=context,
                server_hostname=server_hostname,
            )
            results.append(
                await repreparer.fire(
                    _prepare_spec(),
                    params={"call_sid": CALL},
                    client_headers=[],
                    idempotency="idem",
                    request_id="rid",
                )
            )
            await repreparer.close()
    named, by_ip = results
    assert named.succeeded, named.detail
    assert names[0] == UPSTREAM_NAME
    assert not by_ip.succeeded
    assert "IP address mismatch" in by_ip.detail


@pytest.mark.anyio
async def test_upstream_client_names_a_refused_client_certificate(pki: Pki) -> None:
    """The forwarding client on asyncio's own loop: the refusal alert becomes UpstreamUnavailable naming it."""
    with AlertingUpstream(pki.upstream, pki.ca_file) as server:
        upstream = Upstream(
            UpstreamSettings(
                url=server.url,
                connect_timeout=2,
                read_timeout=5,
                pool_size=2,
                ssl_context=client_context(ca_file=pki.ca_file),
            )
        )
        await upstream.start()
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.send("GET", b"/bytes", [], None)
        await upstream.close()
    assert not isinstance(caught.value, StaleConnection)
    assert "certificate required" in str(caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("lost_with", "stale"),
    [
        (ssl.SSLError(1, "[SSL: BAD_RECORD_MAC] bad record mac (_ssl.c:2580)"), False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"), True),
        (None, True),
    ],
)
async def test_tls_failure_on_a_reused_connection_is_not_stale(
    lost_with: Exception | None, stale: bool
) -> None:
    """A kept-alive connection lost before any response byte is stale (retried) when it merely closed, an EOF without close_notify included; a TLS error is a failure to name instead."""
    limits = ConnectionLimits("upstream.test:443", 5.0, 65536, 200, 65536)
    connection = UpstreamConnection(limits, memoryview(bytearray(1024)), lambda _c: None)
    connection.reused = True
    exchange = connection.begin(is_head=False)
    connection.connection_lost(lost_with)
    connection.finish()
    assert isinstance(exchange.error, UpstreamUnavailable)
    assert isinstance(exchange.error, StaleConnection) is stale
    if not stale:
        assert str(exchange.error) == (
            "TLS error from upstream upstream.test:443: [SSL: BAD_RECORD_MAC] bad record mac"
        )
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("error", "described", "failure"),
    [
        (
            ssl.SSLError(
                1,
                "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
                "required (_ssl.c:2580)",
            ),
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
            True,
        ),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"), None, False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), None, False),
        (ConnectionResetError(104, "Connection reset by peer"), None, False),
    ],
)
def test_tls_errors_told_apart_and_described(
    error: OSError, described: str | None, failure: bool
) -> None:
    """is_tls_failure: TLS errors yes, clean or unclean closes no; describe_tls_error drops the C source location."""
    assert is_tls_failure(error) is failure
    if described is not None:
        assert isinstance(error, ssl.SSLError)
        assert describe_tls_error(error) == described


def test_verification_error_is_described_by_its_verify_message(pki: Pki) -> None:
    """A failed certificate check is told in the checker's words."""
    context = client_context(ca_file=pki.other_ca_file)
    with https_upstream(pki.upstream) as upstream:
        with (
            socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError) as caught,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
    assert describe_tls_error(caught.value) == (
        "certificate verify failed: unable to get local issuer certificate"
    )
