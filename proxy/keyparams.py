"""The route parameters behind a job key, for an operator's re-prepare (admin API). Pure.

A poll's re-prepare fills its path template from the poll's route parameters; the admin API has
only the key. Each route of the job whose key template (its `key`, or its path parameters joined
with ":") names every parameter the re-prepare path needs is inverted: each `{name}` matches one
or more characters other than `/`. The inversion must be unambiguous — the shortest and longest
matches agree (e.g. a key "a:b:c" under "{x}:{y}" is ambiguous) — and every route that inverts
must agree on the needed values; otherwise `NeedsParams` says why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from proxy.routes import (
    DEFAULT_KEY_SEPARATOR,
    RouteSpec,
    fill_template,
    is_guardable_param,
    template_params,
    template_parts,
)


class NeedsParams(ValueError):
    """The key alone does not give the re-prepare path's parameters; the message says why."""


def key_template(route: RouteSpec) -> str:
    if route.key is not None:
        return route.key
    return DEFAULT_KEY_SEPARATOR.join(f"{{{name}}}" for name in template_params(route.path))


def _inverse(template: str, *, lazy: bool) -> re.Pattern[str]:
    regex = "".join(
        re.escape(literal) if name is None else f"(?P<{name}>[^/]+{'?' if lazy else ''})"
        for literal, name in template_parts(template)
    )
    return re.compile(regex)


def params_from_key(
    routes: Sequence[RouteSpec], job: str, key: str, needed: Sequence[str]
) -> Mapping[str, str]:
    """The values of the `needed` parameters for `key` of `job`; NeedsParams when no route
    gives them unambiguously."""
    if not needed:
        return {}
    found: list[dict[str, str]] = []
    reasons: list[str] = []
    for route in routes:
        if route.job != job:
            continue
        template = key_template(route)
        names = template_params(template)
        missing = [name for name in needed if name not in names]
        if missing:
            reasons.append(f"route {route.path!r}: its key {template!r} lacks {missing}")
            continue
        greedy = _inverse(template, lazy=False).fullmatch(key)
        lazy = _inverse(template, lazy=True).fullmatch(key)
        if greedy is None or lazy is None:
            reasons.append(f"route {route.path!r}: the key does not fit {template!r}")
            continue
        if greedy.groupdict() != lazy.groupdict():
            reasons.append(
                f"route {route.path!r}: the key splits more than one way under {template!r}"
            )
            continue
        values = {name: greedy.group(name) for name in needed}
        if not all(is_guardable_param(value) for value in values.values()):
            reasons.append(f"route {route.path!r}: a parameter cannot be one path segment")
            continue
        if fill_template(template, greedy.groupdict()) != key:
            continue
        found.append(values)
    if not found:
        detail = "; ".join(reasons) or f"job {job!r} has no route"
        raise NeedsParams(
            f"the re-prepare path needs {list(needed)}, not derivable from the key: {detail}"
        )
    if any(values != found[0] for values in found[1:]):
        raise NeedsParams(f"the routes of job {job!r} derive different {list(needed)} from the key")
    return found[0]
