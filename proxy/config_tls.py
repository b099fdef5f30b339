"""The TLS sections of the config, `server.tls` and `upstream.tls`: frozen, and checked at load
by building the very contexts the running process will build (proxy.tls), so a file that passes
`check-config` is one pollguard can use, and a file that can't be used is named by its field."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from ipaddress import ip_address
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, model_validator

from proxy.config_loading import FieldProblems, Path, Section, blank_to_none
from proxy.tls import check_certificates, check_server_files, client_context, describe_tls_error

__all__ = ["ServerTLSConfig", "UpstreamTLSConfig"]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def _readable_file(path: str) -> str:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except FileNotFoundError:
        raise ValueError(f"no file at {path!r} — give the path of an existing PEM file") from None
    except IsADirectoryError:
        raise ValueError(f"{path!r} is a directory — give the path of a PEM file") from None
    except OSError as exc:
        raise ValueError(
            f"{path!r} can't be read ({exc.strerror or exc}) — make it readable by the user "
            "pollguard runs as"
        ) from None
    return path


def _server_name(name: str) -> str:
    try:
        ip_address(name)
    except ValueError:
        if not _HOSTNAME.match(name):
            raise ValueError(
                f"invalid server_name {name!r} — a DNS name the upstream's certificate is issued "
                "for, without scheme, port or path, e.g. backend.internal"
            ) from None
    return name


def _optional(check: Callable[[str], str]) -> Callable[[str | None], str | None]:
    return lambda value: None if value is None else check(value)


# A path as given (relative ones from the working directory); an empty value (`${CA:-}` unset)
# means "not set".
PemFile = Annotated[
    str | None, BeforeValidator(blank_to_none), AfterValidator(_optional(_readable_file))
]
ServerName = Annotated[
    str | None, BeforeValidator(blank_to_none), AfterValidator(_optional(_server_name))
]


class ServerTLSConfig(Section):
    """HTTPS on the listening side: off unless cert_file is set."""

    cert_file: PemFile = None
    key_file: PemFile = None
    ca_file: PemFile = None  # clients must present a certificate this CA issued

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _complete_and_loadable(self) -> ServerTLSConfig:
        problems = _pair_problems(self.cert_file, self.key_file, "serve HTTPS")
        if self.ca_file is not None and self.cert_file is None:
            problems.append(
                (
                    ("ca_file",),
                    "set without cert_file — client certificates can only be required over "
                    "TLS; set cert_file and key_file too, or remove ca_file",
                )
            )
        if not problems and self.cert_file is not None and self.key_file is not None:
            cert_file, key_file, ca_file = self.cert_file, self.key_file, self.ca_file
            problems = _load_problems(
                cert_file,
                key_file,
                ca_file,
                lambda: check_server_files(cert_file, key_file, ca_file),
            )
        if problems:
            raise FieldProblems(problems)
        return self


class UpstreamTLSConfig(Section):
    """The client side of an https:// upstream; the defaults verify it against the system's
    trust store, with the URL's host as SNI and expected name."""

    ca_file: PemFile = None  # trust only these CAs instead of the system's
    verify: bool = True
    cert_file: PemFile = None  # client certificate, for an upstream that requires one (mTLS)
    key_file: PemFile = None
    server_name: ServerName = None  # SNI and the name verified; default: the URL's host

    @model_validator(mode="after")
    def _complete_and_loadable(self) -> UpstreamTLSConfig:
        problems = _pair_problems(self.cert_file, self.key_file, "present a client certificate")
        if not problems:
            problems = _load_problems(
                self.cert_file,
                self.key_file,
                self.ca_file,
                lambda: client_context(
                    ca_file=self.ca_file,
                    verify=self.verify,
                    cert_file=self.cert_file,
                    key_file=self.key_file,
                ),
            )
        if problems:
            raise FieldProblems(problems)
        return self


def _pair_problems(
    cert_file: str | None, key_file: str | None, purpose: str
) -> list[tuple[Path, str]]:
    if (cert_file is None) == (key_file is None):
        return []
    given, missing = ("cert_file", "key_file") if key_file is None else ("key_file", "cert_file")
    return [
        (
            (missing,),
            f"required with {given} — to {purpose} pollguard needs both the certificate and "
            "its private key (both may name one PEM file holding the two)",
        )
    ]


def _load_problems(
    cert_file: str | None,
    key_file: str | None,
    ca_file: str | None,
    load: Callable[[], object],
) -> list[tuple[Path, str]]:
    """Which file keeps the context from loading: the CA, the certificate, else the key."""
    problems: list[tuple[Path, str]] = []
    for field, path in (("ca_file", ca_file), ("cert_file", cert_file)):
        if path is None:
            continue
        try:
            check_certificates(path)
        except (ssl.SSLError, OSError) as exc:
            problems.append(
                (
                    (field,),
                    f"{path!r} holds no usable PEM certificate ({_reason(exc)}) — give the "
                    "certificate in PEM form (-----BEGIN CERTIFICATE-----)",
                )
            )
    if problems:
        return problems
    try:
        load()
    except (ssl.SSLError, OSError) as exc:
        return [
            (
                ("key_file",),
                f"{key_file!r} is not the private key of cert_file {cert_file!r}, or not an "
                f"unencrypted PEM key ({_reason(exc)}) — give the key the certificate was "
                "issued for, without a passphrase",
            )
        ]
    return []


def _reason(exc: ssl.SSLError | OSError) -> str:
    return describe_tls_error(exc) if isinstance(exc, ssl.SSLError) else str(exc.strerror or exc)
