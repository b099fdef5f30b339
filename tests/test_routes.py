"""Route matching, job keys and template filling."""

from __future__ import annotations

import re

import pytest

from proxy.errors import ConfigError
from proxy.routes import (
    MAX_KEY_BYTES,
    RouteSpec,
    RouteTable,
    fill_path_template,
    fill_template,
    is_guardable_key,
    is_guardable_param,
    template_params,
)

GET = frozenset({"GET"})

TABLE = RouteTable(
    [
        RouteSpec("/Accounts/{account}/Recordings/{sid}.json", GET, "recording"),
        RouteSpec("/exports/{eid}", frozenset({"get", "HEAD"}), "export", "export-{eid}"),
        RouteSpec("/reports/{year}/{name}", GET, "report", "{name}@{year}"),
        RouteSpec("/reports/{year}/{name}", frozenset({"POST"}), "report-post"),
        RouteSpec("/a+b/(x)/[y]?/{id}", GET, "literal"),
    ]
)


def test_default_key_joins_params_in_path_order() -> None:
    """Without a key template the key is the parameters joined with ':' in path order."""
    found = TABLE.match("GET", "/Accounts/AC1/Recordings/RE9.json")
    assert found is not None
    assert (found.job, found.key) == ("recording", "AC1:RE9")
    assert dict(found.params) == {"account": "AC1", "sid": "RE9"}


def test_key_template_is_filled_with_params() -> None:
    """A key template is filled verbatim from the path's parameters."""
    found = TABLE.match("GET", "/reports/2024/q1 sales")
    assert found is not None
    assert (found.job, found.key) == ("report", "q1 sales@2024")


@pytest.mark.parametrize(
    ("method", "job"),
    [("GET", "export"), ("get", None), ("HEAD", "export"), ("POST", None), ("DELETE", None)],
)
def test_methods_filter_routes_case_sensitively(method: str, job: str | None) -> None:
    """Only listed methods match; request methods are case-sensitive (RFC 9110 §9.1), config is upper-cased."""
    found = TABLE.match(method, "/exports/e1")
    assert (found.job if found else None) == job
    if found is not None:
        assert found.key == "export-e1"


def test_first_matching_route_for_the_method_wins() -> None:
    """The same path routes to different jobs by method, in configuration order."""
    found = TABLE.match("POST", "/reports/2024/x")
    assert found is not None
    assert (found.job, found.key) == ("report-post", "2024:x")


@pytest.mark.parametrize(
    "path",
    [
        "/Accounts/AC1/Recordings/RE9.jsonx",
        "/Accounts/AC1/Recordings/RE9xjson",
        "/Accounts/AC1/Recordings/.json",
        "/Accounts//Recordings/RE9.json",
        "/Accounts/AC1/x/Recordings/RE9.json",
        "/prefix/Accounts/AC1/Recordings/RE9.json",
        "/exports/e1/",
        "/exports/",
        "/exports",
        "/nothing",
        "",
    ],
)
def test_non_matching_paths(path: str) -> None:
    """Anchored matching: no partial, empty-segment or multi-segment parameters."""
    assert TABLE.match("GET", path) is None


@pytest.mark.parametrize(
    ("path", "possible"),
    [
        ("/Accounts/AC1/Recordings/RE9.json", True),
        ("/Accounts/", True),  # a route's literal start: matching decides the rest
        ("/exports/e1", True),
        ("/a+b/(x)/[y]?/7", True),
        ("/Account", False),
        ("/prefix/Accounts/AC1/Recordings/RE9.json", False),
        ("/nothing", False),
        ("", False),
    ],
)
def test_may_match_is_a_necessary_condition(path: str, possible: bool) -> None:
    """may_match is False only where no route can match (no route's literal start), so the
    guard can skip matching and caching for those paths."""
    assert TABLE.may_match(path) is possible
    if not possible:
        assert all(TABLE.match(method, path) is None for method in ("GET", "HEAD", "POST"))
    assert RouteTable([]).may_match(path) is False


def test_literal_regex_characters_are_escaped() -> None:
    """Regex metacharacters in a template are literal text."""
    found = TABLE.match("GET", "/a+b/(x)/[y]?/7")
    assert found is not None
    assert (found.job, found.key) == ("literal", "7")
    assert TABLE.match("GET", "/aab/(x)/[y]?/7") is None
    assert TABLE.match("GET", "/a+b/x/y/7") is None


def test_empty_table_is_falsy() -> None:
    """An empty table is falsy so the handler can skip matching entirely."""
    assert not RouteTable([])
    assert len(RouteTable([])) == 0
    assert TABLE
    assert len(TABLE) == 5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RouteSpec("/x/{id}/{id}", GET, "j"), "duplicate parameter"),
        (RouteSpec("/x/{id", GET, "j"), "unbalanced brace"),
        (RouteSpec("/x/{1d}", GET, "j"), "invalid parameter"),
        (RouteSpec("/x/{id}", GET, "j", "{other}"), "other"),
    ],
)
def test_bad_templates_are_config_errors(spec: RouteSpec, message: str) -> None:
    """Malformed templates fail at construction with a message naming the problem."""
    with pytest.raises(ConfigError, match=message):
        RouteTable([spec])


def test_template_params_in_order() -> None:
    """template_params lists placeholder names in order of appearance."""
    assert template_params("/a/{x}/b/{y_2}.json") == ("x", "y_2")
    assert template_params("/static") == ()


def test_fill_templates() -> None:
    """Keys are filled verbatim; paths percent-encode each value as one segment."""
    params = {"sid": "a b#c?d%;e..f", "account": "AC1"}
    assert fill_template("{account}:{sid}", params) == "AC1:a b#c?d%;e..f"
    assert fill_path_template("/Accounts/{account}/Prepare/{sid}", params) == (
        "/Accounts/AC1/Prepare/a%20b%23c%3Fd%25%3Be..f"
    )
    assert fill_path_template("/ü/{account}", {"account": "é"}) == "/ü/%C3%A9"


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", "/", "a\x00", "a\r\nb", "a\x7f", "a\x85"])
def test_fill_path_refuses_what_cannot_be_one_segment(value: str) -> None:
    """A dot segment, an empty value, a slash or a control character never reaches a re-prepare path."""
    assert not is_guardable_param(value)
    with pytest.raises(ValueError, match="cannot be one path segment"):
        fill_path_template("/x/{sid}/prepare", {"sid": value})


@pytest.mark.parametrize(
    ("path", "guarded"),
    [
        ("/exports/e1", True),
        ("/exports/a..b", True),
        ("/exports/.x", True),
        ("/exports/\u2028", True),  # not a control character: guarded, escaped in logs
        ("/exports/..", False),
        ("/exports/.", False),
        ("/exports/e1\r\nforged", False),
        ("/exports/e1\x00", False),
        ("/exports/e1\x85", False),
        ("/exports/e1\ud800", False),
        ("/reports/2024/..", False),
        ("/reports/./q1", False),
    ],
)
def test_unsafe_parameters_are_not_guarded(path: str, guarded: bool) -> None:
    """A request whose parameters include `.`/`..` or control characters matches no route: it is forwarded unguarded."""
    assert (TABLE.match("GET", path) is not None) is guarded


@pytest.mark.parametrize(
    ("raw_path", "guarded"),
    [
        (b"/reports/2024/q1", True),
        (b"/reports/2024%2Fq1", False),
        (b"/reports/2024%2fq1", False),
    ],
)
def test_encoded_slash_in_the_raw_path_is_not_guarded(raw_path: bytes, guarded: bool) -> None:
    """With the raw path known, a decoded path whose slashes came from %2F is not guarded: the key would not name the segment the backend saw."""
    assert (TABLE.match("GET", "/reports/2024/q1", raw_path) is not None) is guarded


def test_fill_with_missing_param_is_a_config_error() -> None:
    """Filling a template with a parameter that is not available names the parameter."""
    with pytest.raises(ConfigError, match="sid"):
        fill_path_template("/x/{sid}", {"account": "AC1"})


@pytest.mark.parametrize(
    ("key", "pattern", "guardable"),
    [
        ("a" * MAX_KEY_BYTES, None, True),
        ("a" * (MAX_KEY_BYTES + 1), None, False),
        ("é" * (MAX_KEY_BYTES // 2), None, True),
        ("é" * (MAX_KEY_BYTES // 2) + "a", None, False),
        ("\udcff", None, False),
        ("AC1:RE9", re.compile(r"^AC[0-9]+:RE[0-9]+$"), True),
        ("AC1:RE9x", re.compile(r"^AC[0-9]+:RE[0-9]+$"), False),
        ("xRE9x", re.compile(r"RE[0-9]"), True),
        ("", None, True),
    ],
)
def test_is_guardable_key(key: str, pattern: re.Pattern[str] | None, guardable: bool) -> None:
    """Keys over 256 UTF-8 bytes, unencodable, or not found by the pattern are not guarded."""
    assert is_guardable_key(key, pattern) is guardable
