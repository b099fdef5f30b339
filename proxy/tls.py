"""TLS in one place: the client context of every connection pollguard opens to an https://
upstream (forwarding, the re-prepare, WebSocket), the server's certificate files as uvicorn takes
them, and a TLS failure told in one line.

No config import here: the config validates its files by building these very contexts, so a
file that loads at `check-config` time is a file the running process can use.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, TypeGuard

__all__ = [
    "MINIMUM_VERSION",
    "check_certificates",
    "check_server_files",
    "client_context",
    "describe_tls_error",
    "is_tls_failure",
    "uvicorn_ssl_options",
]

# TLS 1.0 and 1.1 are deprecated (RFC 8996); Python's own default floor, stated, not assumed.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# pollguard speaks HTTP/1.1 to the upstream. httpcore sets the same on the context it is given
# (the re-prepare's); set here, an upstream that prefers h2 can never pick it for a connection
# of our own HTTP/1.1 client either.
ALPN_PROTOCOLS = ["http/1.1"]
_SOURCE_SUFFIX = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def client_context(
    *,
    ca_file: str | None = None,
    verify: bool = True,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ssl.SSLContext:
    """The client context for an https:// upstream: `ca_file` replaces the system trust store,
    `verify=False` checks neither certificate nor hostname, `cert_file`/`key_file` are the
    client certificate offered to an upstream that asks for one (mTLS).

    Raises ssl.SSLError or OSError for a file that can't be used.
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    if not verify:
        context.check_hostname = False  # must go first: CERT_NONE is refused while it is on
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def check_server_files(cert_file: str, key_file: str, ca_file: str | None) -> None:
    """Load the listening side's files the way uvicorn will; ssl.SSLError or OSError if not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)


def check_certificates(path: str) -> None:
    """ssl.SSLError unless `path` holds at least one PEM certificate."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)


def uvicorn_ssl_options(
    cert_file: str | None, key_file: str | None, ca_file: str | None
) -> dict[str, Any]:
    """uvicorn.run keyword arguments for the listening side; {} without a certificate.

    With `ca_file`, every client must present a certificate issued by it (CERT_REQUIRED).
    """
    if cert_file is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": cert_file, "ssl_keyfile": key_file}
    if ca_file is not None:
        options["ssl_ca_certs"] = ca_file
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def is_tls_failure(exc: BaseException | None) -> TypeGuard[ssl.SSLError]:
    """A TLS error worth naming, as opposed to a connection that merely ended: an EOF without
    close_notify (how many servers close an idle connection) is a close, not a failure."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    )


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One line naming what failed: the certificate check's own words when verification failed
    (`certificate verify failed: unable to get local issuer certificate`), else OpenSSL's
    (`[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required`)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return _SOURCE_SUFFIX.sub("", text) or type(exc).__name__
