"""From config text to plain data and back from pydantic errors to human lines: YAML reading,
`${VAR}` interpolation, duration and `{name}` template parsing, ValidationError translation.
The models themselves live in proxy.config; nothing here knows their fields."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeGuard, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from proxy.errors import ConfigError

DURATION_HINT = "use a number of seconds or a value like 250ms, 2s, 5m, 1h"

# Durations are parsed by hand on purpose: the accepted grammar is four units and a number, the
# candidate libraries (pytimeparse, isodate, humanfriendly) each accept a different, larger
# grammar and would be a new runtime dependency for ~15 lines of code.
_SECONDS_PER_UNIT: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(
    r"^\s*(?P<number>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(?P<unit>ms|s|m|h)\s*$"
)

# `${NAME}` or `${NAME:-default}`; `$${` is an escaped literal `${`.
_ENV_REF_RE = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
_ENV_ESCAPE = "$${"
_ENV_HINT = "use ${NAME} or ${NAME:-default}, or $${ for a literal ${"


Path = tuple[str | int, ...]


def blank_to_none(value: object) -> object:
    """An empty or blank string (an unset `${VAR:-}`) means the optional field is not set."""
    return None if isinstance(value, str) and not value.strip() else value


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys refused, `name:` alone = defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        # `state:` with nothing under it parses as null; treat it like an omitted section.
        return {} if data is None else data


def dotted_path(loc: Path) -> str:
    """`("routes", 0, "job")` -> `routes[0].job`: the spelling used in every message."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_duration(value: object) -> float:
    """Seconds as a float from `250ms`/`2s`/`5m`/`1h`, a number, or a numeric string; > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid duration {short_repr(value)} — {DURATION_HINT}")
    seconds: float
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if match is not None:
            seconds = float(match["number"]) * _SECONDS_PER_UNIT[match["unit"]]
        else:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"invalid duration {value!r} — {DURATION_HINT}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {short_repr(value)} — {DURATION_HINT}")
    if seconds <= 0:
        raise ValueError(
            f"duration must be greater than 0, got {short_repr(value)} — {DURATION_HINT}"
        )
    return seconds


SIZE_HINT = "use a number of bytes or a value like 512B, 64KiB, 16MiB, 1GiB"
_BYTES_PER_UNIT: dict[str, int] = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE_RE = re.compile(r"^\s*(?P<number>[0-9]+)\s*(?P<unit>B|KiB|MiB|GiB)?\s*$")


def parse_size(value: object) -> int:
    """Bytes as an int from `512B`/`64KiB`/`16MiB`/`1GiB` or a whole number; > 0.

    Binary units only, spelt as IEC writes them: `64KB` is ambiguous (1000 or 1024?) and is
    refused rather than guessed.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid size {short_repr(value)} — {SIZE_HINT}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"invalid size {short_repr(value)} — {SIZE_HINT}")
        size = int(match["number"]) * _BYTES_PER_UNIT[match["unit"] or "B"]
    if size <= 0:
        raise ValueError(f"size must be greater than 0, got {short_repr(value)} — {SIZE_HINT}")
    return size


def format_size(size: int) -> str:
    """The largest exact unit: 65536 -> `64KiB`, 1000 -> `1000B`."""
    for unit in ("GiB", "MiB", "KiB"):
        if size % _BYTES_PER_UNIT[unit] == 0:
            return f"{size // _BYTES_PER_UNIT[unit]}{unit}"
    return f"{size}B"


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 3600 -> `1h`, 300 -> `5m`, 2 -> `2s`, 0.25 -> `250ms`."""
    for unit in ("h", "m", "s", "ms"):
        count = seconds / _SECONDS_PER_UNIT[unit]
        if count >= 1 and math.isclose(count, round(count), rel_tol=0, abs_tol=1e-9):
            return f"{round(count)}{unit}"
    return repr(float(seconds))


def interpolate_env(data: Any, env: Mapping[str, str], problems: list[tuple[Path, str]]) -> Any:
    """Replace `${VAR}` references in every string scalar (keys excluded), recording problems.

    Interpolating scalars after parsing, rather than the raw text, means a value such as a token
    containing `#` or `: ` cannot change the YAML structure, comments are never interpolated,
    and every error can name its field.
    """
    return _interpolate(data, env, (), problems)


def _interpolate(
    data: Any, env: Mapping[str, str], loc: Path, problems: list[tuple[Path, str]]
) -> Any:
    if isinstance(data, dict):
        return {key: _interpolate(value, env, (*loc, key), problems) for key, value in data.items()}
    if isinstance(data, list):
        return [_interpolate(item, env, (*loc, index), problems) for index, item in enumerate(data)]
    if isinstance(data, str):
        return _interpolate_string(data, env, loc, problems)
    return data


def _interpolate_string(
    text: str, env: Mapping[str, str], loc: Path, problems: list[tuple[Path, str]]
) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == _ENV_ESCAPE:
            return "${"
        name, default = match["name"], match["default"]
        value = env.get(name)
        if default is not None:
            # Like the shell's `:-`: the default also applies when the variable is set but empty.
            return value if value else default
        if value is None:
            problems.append(
                (
                    loc,
                    f"environment variable {name} is not set — export {name}, "
                    f"or give a default like ${{{name}:-value}}",
                )
            )
            return ""
        return value

    result = _ENV_REF_RE.sub(replace, text)
    # A `${` the pattern did not consume is a malformed reference; leaving it in would hide typos.
    if "${" in _ENV_REF_RE.sub("", text):
        problems.append((loc, f"malformed environment reference in {text!r} — {_ENV_HINT}"))
    return result


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys: PyYAML silently keeps the last one."""


def _construct_mapping_without_duplicates(
    loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} — remove one of them", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)


def load_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text whose top level must be a mapping (an empty document counts as `{}`)."""
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML — {_one_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (upstream, state, admin, "
            f"jobs, routes), got {type(data).__name__}"
        )
    return data


def _one_line(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f"{exc.context}, " if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {context}{exc.problem}"
    return " ".join(str(exc).split())


class FieldProblems(ValueError):
    """Raised by model validators to report several problems at paths relative to the model."""

    def __init__(self, problems: list[tuple[Path, str]]) -> None:
        super().__init__("; ".join(f"{dotted_path(loc)}: {message}" for loc, message in problems))
        self.problems = problems


def translate_validation_error(
    exc: ValidationError,
    root: type[BaseModel],
    source: str,
    missing_hints: Mapping[tuple[type[BaseModel], str], str],
) -> ConfigError:
    """One `source: dotted.path: problem — fix` line per pydantic error."""
    lines: list[str] = []
    for error in exc.errors():
        loc: Path = tuple(error["loc"])
        for sub_loc, message in _describe(error, loc, root, missing_hints):
            lines.append(f"{source}: {dotted_path((*loc, *sub_loc))}: {message}")
    return ConfigError("\n".join(lines))


def _describe(
    error: ErrorDetails,
    loc: Path,
    root: type[BaseModel],
    missing_hints: Mapping[tuple[type[BaseModel], str], str],
) -> list[tuple[Path, str]]:
    kind = error["type"]
    value = error.get("input")
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, FieldProblems):
            return cause.problems
        return [((), str(cause))]
    if kind == "missing":
        parent = _model_at(root, loc[:-1])
        hint = missing_hints.get((parent, str(loc[-1])), "add it") if parent else "add it"
        return [((), f"field required — {hint}")]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = ", ".join(parent.model_fields) if parent else "see the shipped config.yaml"
        return [((), f"unknown key — remove it or check the spelling (valid keys: {valid})")]
    if kind in _BOUND_MESSAGES:
        bound_name, symbol = _BOUND_MESSAGES[kind]
        return [((), f"must be {symbol} {ctx[bound_name]}, got {short_repr(value)}")]
    if kind == "literal_error":
        return [((), f"invalid value {short_repr(value)} — use {ctx['expected']}")]
    if kind == "too_short":
        return [((), "must not be empty — list at least one value")]
    for kinds, expected in _TYPE_MESSAGES:
        if kind in kinds:
            return [((), f"expected {expected}, got {short_repr(value)}")]
    return [((), f"{error['msg'].rstrip('.')}, got {short_repr(value)}")]


_BOUND_MESSAGES: dict[str, tuple[str, str]] = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_TYPE_MESSAGES: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"int_parsing", "int_type", "int_from_float"}), "a whole number"),
    (frozenset({"float_parsing", "float_type"}), "a number"),
    (frozenset({"bool_parsing", "bool_type"}), "true or false"),
    (frozenset({"string_type"}), "a text value (quote it)"),
    (frozenset({"dict_type", "model_type", "model_attributes_type", "mapping_type"}), "a mapping"),
    (frozenset({"list_type", "tuple_type", "set_type", "frozen_set_type"}), "a list"),
)


def _model_at(root: type[BaseModel], loc: Path) -> type[BaseModel] | None:
    """The model class found by following `loc` through field annotations, mappings and lists."""
    current: Any = root
    for part in loc:
        if _is_model(current):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
            continue
        origin, args = get_origin(current), get_args(current)
        if origin in (dict, Mapping) and len(args) == 2:
            current = args[1]
        elif origin in (tuple, list, frozenset) and args:
            current = args[0]
        else:
            return None
    return current if _is_model(current) else None


def _is_model(candidate: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


MASK = "***"
_REDIS_QUERY_PASSWORD_RE = re.compile(r"(^|&)(password=)[^&]*")


def mask_redis_url(url: str) -> str:
    """`url` with any password replaced by MASK (for messages and rendered config)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostinfo}"
    query = _REDIS_QUERY_PASSWORD_RE.sub(rf"\1\2{MASK}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
