"""Certificates made at test time with trustme (never a committed key): a private CA, a CA nobody
trusts, server certificates for the upstream and for pollguard, and a client certificate."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

# A name the tests reach by IP (https://127.0.0.1:…): only upstream.tls.server_name makes it match.
UPSTREAM_NAME = "upstream.test"


@dataclass(frozen=True)
class KeyPair:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Pki:
    ca_file: str  # the private CA that issued every certificate below
    other_ca_file: str  # a CA that issued none of them
    upstream: KeyPair  # for 127.0.0.1 and localhost
    named_upstream: KeyPair  # for UPSTREAM_NAME only
    proxy: KeyPair  # pollguard's listening certificate, for 127.0.0.1
    client: KeyPair  # a client certificate (pollguard to an mTLS upstream, a client to pollguard)

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting the private CA, presenting the client certificate if asked."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if with_cert:
            context.load_cert_chain(self.client.cert_file, self.client.key_file)
        return context


def make_pki(directory: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()

    def write(name: str, leaf: trustme.LeafCert) -> KeyPair:
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return KeyPair(str(cert), str(key))

    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    return Pki(
        ca_file=str(directory / "ca.pem"),
        other_ca_file=str(directory / "other-ca.pem"),
        upstream=write("upstream", ca.issue_cert("127.0.0.1", "localhost")),
        named_upstream=write("named-upstream", ca.issue_cert(UPSTREAM_NAME)),
        proxy=write("proxy", ca.issue_cert("127.0.0.1")),
        client=write("client", ca.issue_cert("pollguard-client")),
    )
