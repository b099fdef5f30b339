"""Which requests are guarded: `{name}` path templates compiled into anchored regexes.

Pure: no I/O. A template is literal text with `{name}` placeholders; each placeholder matches one
non-empty path segment. The job key defaults to the parameters joined with ":" in path order.

Parameters come from the *decoded* request path and are later put back into the re-prepare's
path, so a parameter that could not be one plain segment there is never guarded (the request is
forwarded unguarded, untouched): `.` and `..` (raw or percent-encoded — they would climb out of
the re-prepare template), the empty string, anything containing `/` or a `%2F` in the raw path
(the decoded path splits segments the backend may see as one), control characters (C0, DEL, C1:
they have no business in a job key, and would reach logs and the state store) and lone
surrogates (not encodable as UTF-8).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import quote

from proxy.errors import ConfigError

MAX_KEY_BYTES = 256
DEFAULT_KEY_SEPARATOR = ":"

# Anything between a pair of braces is a placeholder, so "{1st}" is named invalid, not stray.
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEGMENT = "[^/]+"
_DOT_SEGMENTS = frozenset({"", ".", ".."})
# "/" cannot come out of _SEGMENT; it is listed so the predicate holds on its own.
_UNSAFE_PARAM_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f/\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A guarded route: requests to `path` with one of `methods` belong to `job`; `key` is a
    template over the path's parameters (None: the parameters joined with ":")."""

    path: str
    methods: frozenset[str]
    job: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    job: str
    key: str
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    spec: RouteSpec
    methods: frozenset[str]
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    prefix: str  # the literal text before the first parameter: a cheap first test


class TemplateError(ConfigError, ValueError):
    """A malformed path or key template. A ValueError too, so that a config validator turns it
    into a field problem naming the path."""


def template_params(template: str) -> tuple[str, ...]:
    """The `{name}`s of a path or key template, in order; TemplateError if malformed."""
    return tuple(name for _, name in template_parts(template) if name is not None)


def fill_template(template: str, params: Mapping[str, str]) -> str:
    """`template` with each `{name}` replaced by params[name] verbatim (for job keys)."""
    return _fill(template, params, encode=False)


def fill_path_template(template: str, params: Mapping[str, str]) -> str:
    """`template` with each `{name}` replaced by params[name] percent-encoded as one path
    segment: route parameters come from the decoded request path and must be re-encoded.

    Every byte but the RFC 3986 unreserved characters is percent-encoded, so no value can add a
    segment, a query or a fragment; ValueError for a value that is not `is_guardable_param`
    (RouteTable never matches those: this is the second line of defence, at the point of use).
    """
    return _fill(template, params, encode=True)


def is_guardable_param(value: str) -> bool:
    """Whether a decoded path parameter can stand as one segment of the re-prepare path: not
    empty, `.` or `..`, without `/`, control characters (C0, DEL, C1) or lone surrogates."""
    return value not in _DOT_SEGMENTS and _UNSAFE_PARAM_CHAR.search(value) is None


def is_guardable_key(key: str, pattern: re.Pattern[str] | None) -> bool:
    """Whether `key` may be tracked: at most MAX_KEY_BYTES of UTF-8 and, if a pattern is given,
    `pattern.search(key)` finds it (search, so a pattern's own ^...$ anchors work as written)."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a mis-decoded path: never store them
        return False
    if size > MAX_KEY_BYTES:
        return False
    return pattern is None or pattern.search(key) is not None


class RouteTable:
    """Guarded routes in configuration order; the first route that matches wins."""

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        self._routes = tuple(_compile(spec) for spec in specs)
        self._prefixes = tuple(route.prefix for route in self._routes)

    def __bool__(self) -> bool:
        return bool(self._routes)

    @property
    def specs(self) -> tuple[RouteSpec, ...]:
        """The routes as configured, in order."""
        return tuple(route.spec for route in self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def may_match(self, path: str) -> bool:
        """False when no route can match `path`: its literal start is no route's. One C call
        (str.startswith over all the prefixes), so an unguarded request costs next to nothing."""
        return path.startswith(self._prefixes)

    def match(self, method: str, path: str, raw_path: bytes | None = None) -> RouteMatch | None:
        """The first route matching `method` (ASGI methods are upper-case) and the decoded
        `path`, or None; also None when that route's parameters are not all guardable (see the
        module docstring) — such a request is not guarded by any route. `raw_path` (the request
        target's path as sent, when known) refuses paths with an encoded slash. Runs on every
        proxied request, so the cheap tests come first."""
        for route in self._routes:
            if method not in route.methods or not path.startswith(route.prefix):
                continue
            found = route.pattern.fullmatch(path)
            if found is None:
                continue
            params = found.groupdict()
            for value in params.values():  # a loop, not all(genexpr): this runs per poll
                if not is_guardable_param(value):
                    return None
            if raw_path is not None and (b"%2F" in raw_path or b"%2f" in raw_path):
                return None
            return RouteMatch(
                job=route.spec.job,
                key=_route_key(route, params),
                params=MappingProxyType(params),
            )
        return None


def _compile(spec: RouteSpec) -> _CompiledRoute:
    names = template_params(spec.path)
    if spec.key is not None:
        unknown = [name for name in template_params(spec.key) if name not in names]
        if unknown:
            raise ConfigError(
                f"route {spec.path!r} of job {spec.job!r}: key {spec.key!r} uses "
                f"{', '.join(unknown)}, which the path does not define; use one of {list(names)}"
            )
    parts = template_parts(spec.path)
    regex = "".join(
        re.escape(literal) if name is None else f"(?P<{name}>{_SEGMENT})" for literal, name in parts
    )
    return _CompiledRoute(
        spec=spec,
        methods=frozenset(method.upper() for method in spec.methods),
        pattern=re.compile(regex),
        params=names,
        prefix=parts[0][0] if parts else "",
    )


def _route_key(route: _CompiledRoute, params: Mapping[str, str]) -> str:
    if route.spec.key is None:
        return DEFAULT_KEY_SEPARATOR.join(params[name] for name in route.params)
    return fill_template(route.spec.key, params)


@functools.lru_cache(maxsize=256)  # templates come from config: few, and filled per request
def template_parts(template: str) -> tuple[tuple[str, str | None], ...]:
    """Alternating (literal, None) and ("", name) parts of a path or key template: the one
    parser of `{name}` templates (routes, keys, the re-prepare path, config validation).
    TemplateError for a name that is not an identifier, a name used twice, or a lone brace."""
    parts: list[tuple[str, str | None]] = []
    names: set[str] = set()
    position = 0
    for found in _PLACEHOLDER.finditer(template):
        name = found.group(1)
        if not _IDENTIFIER.fullmatch(name):
            raise TemplateError(
                f"invalid parameter {{{name}}} in {template!r} — a parameter is {{name}} where "
                "name is letters, digits and underscores, not starting with a digit"
            )
        if name in names:
            raise TemplateError(
                f"duplicate parameter {{{name}}} in {template!r} — give each parameter its own name"
            )
        names.add(name)
        if found.start() > position:
            parts.append((template[position : found.start()], None))
        parts.append(("", name))
        position = found.end()
    if position < len(template):
        parts.append((template[position:], None))
    if any(name is None and ("{" in literal or "}" in literal) for literal, name in parts):
        raise TemplateError(
            f"unbalanced brace in {template!r} — write parameters as {{name}}, braces paired"
        )
    return tuple(parts)


def _fill(template: str, params: Mapping[str, str], *, encode: bool) -> str:
    pieces: list[str] = []
    for literal, name in template_parts(template):
        if name is None:
            pieces.append(literal)
            continue
        if name not in params:
            raise ConfigError(f"template {template!r} needs {{{name}}}, which is not available")
        value = params[name]
        if not encode:
            pieces.append(value)
        elif is_guardable_param(value):
            pieces.append(quote(value, safe=""))
        else:
            raise ValueError(f"{{{name}}} = {value!r} cannot be one path segment")
    return "".join(pieces)
