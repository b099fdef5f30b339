"""`pollguard healthcheck`: is the pollguard on this host alive? For container HEALTHCHECKs and
exec probes, which then take the port, the admin prefix and the scheme from the same config file
`serve` reads instead of repeating them in the image or the manifest.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass

from proxy.config import Config

# Wildcard listening addresses are probed over loopback: the probe runs beside the server.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


@dataclass(frozen=True, slots=True)
class Probe:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def probe_for(config: Config) -> Probe:
    """Where the health endpoint of a pollguard serving `config` answers."""
    server = config.server
    host = _WILDCARDS.get(server.host, server.host)
    scheme = "https" if server.tls.enabled else "http"
    return Probe(scheme, host, server.port, config.admin.prefix + "health")


def check(probe: Probe, timeout: float) -> str | None:
    """None when the endpoint answers 200 within `timeout` seconds, else what went wrong."""
    connection: http.client.HTTPConnection
    if probe.scheme == "https":
        # A liveness check of the local process, not of its certificate: the name on it is the
        # public one, never the loopback address probed here.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            probe.host, probe.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(probe.host, probe.port, timeout=timeout)
    try:
        connection.request("GET", probe.path)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"{probe.url}: {exc or type(exc).__name__}"
    finally:
        connection.close()
    return None if status == 200 else f"{probe.url}: status {status}"
