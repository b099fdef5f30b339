"""`pollguard jobs list|show|reset|reprepare|audit`: the job admin API from a shell, over httpx.

Exit 0 when the API answered 2xx, 1 when it answered an error (its problem `detail` and status
are printed), 2 for usage and connection errors (which one is said).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from proxy.config import DEFAULT_ADMIN_PREFIX
from proxy.logtext import log_safe

TOKEN_ENV = "POLLGUARD_ADMIN_TOKEN"
EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2


class _Usage(Exception):
    pass


def add_jobs_parser(commands: Any) -> None:
    jobs = commands.add_parser(
        "jobs",
        help="list, show, reset and re-prepare guarded job episodes through the admin API",
        description="Talk to a running pollguard's job admin API (admin.tokens must be "
        f"configured). The token comes from --token, else ${TOKEN_ENV} (which keeps it out of "
        "`ps`). Exit 0 on success, 1 when the API answered an error, 2 for usage or "
        "connection errors.",
    )
    actions = jobs.add_subparsers(dest="action", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url", required=True, help="pollguard's base URL, e.g. http://127.0.0.1:8080"
        )
        parser.add_argument("--token", help=f"admin bearer token (default: ${TOKEN_ENV})")
        parser.add_argument(
            "--prefix", default=DEFAULT_ADMIN_PREFIX, help="admin.prefix (default: /-/)"
        )
        parser.add_argument("--json", action="store_true", help="print the API's JSON as is")
        parser.add_argument(
            "--timeout", type=float, default=30.0, help="seconds to wait for the answer"
        )
        parser.set_defaults(func=run_jobs)

    listing = actions.add_parser("list", help="episodes of a job, one page (or --all)")
    common(listing)
    listing.add_argument("job")
    listing.add_argument("--state", choices=["pending", "stuck", "terminal"])
    listing.add_argument("--limit", type=int, default=100, help="1..1000 per page")
    listing.add_argument("--cursor", help="continue a listing from the cursor it printed")
    listing.add_argument("--all", action="store_true", help="follow cursors to the end")

    show = actions.add_parser("show", help="one episode")
    common(show)
    show.add_argument("job")
    show.add_argument("key")

    for name, text in (
        ("reset", "forget an episode (the next poll starts a fresh one)"),
        ("reprepare", "fire the job's re-prepare for a key now (same lock and budget)"),
    ):
        write = actions.add_parser(name, help=text)
        common(write)
        write.add_argument("job")
        write.add_argument("key")
        write.add_argument("--reason", help="why (required; recorded in the audit log)")
        if name == "reprepare":
            write.add_argument(
                "--header",
                action="append",
                default=[],
                metavar="NAME:VALUE",
                help="a header to forward (only the job's reprepare.forward_headers are)",
            )

    audit = actions.add_parser("audit", help="the audit log, newest first")
    common(audit)
    audit.add_argument("--limit", type=int, default=20, help="1..1000 entries")


def run_jobs(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    base = args.url.rstrip("/") + args.prefix
    try:
        request = _request(args, base, headers)
    except _Usage as exc:
        print(f"pollguard jobs: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    documents: list[dict[str, Any]] = []
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as client:
            while True:
                method, url, params, body, extra = request
                response = client.request(
                    method, url, params=params, json=body, headers={**headers, **extra}
                )
                if response.status_code >= 400:
                    return _api_error(response)
                document = response.json()
                documents.append(document)
                if not (args.action == "list" and args.all and document.get("cursor")):
                    break
                params = {**params, "cursor": document["cursor"]}
                request = (method, url, params, body, extra)
    except (httpx.TransportError, httpx.InvalidURL, ValueError) as exc:
        what = "bad answer from" if isinstance(exc, ValueError) else "cannot reach"
        print(f"pollguard jobs: connection error: {what} {args.url}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        for document in documents:
            print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        _print_table(args.action, documents)
    return EXIT_OK


Request = tuple[str, str, dict[str, str], Any, dict[str, str]]


def _request(args: argparse.Namespace, base: str, headers: dict[str, str]) -> Request:
    if not args.url.startswith(("http://", "https://")):
        raise _Usage(f"--url must be http:// or https://, got {args.url!r}")
    action = args.action
    if action == "audit":
        _check_limit(args.limit)
        return ("GET", base + "audit", {"limit": str(args.limit)}, None, {})
    job = _segment(args.job)
    if action == "list":
        _check_limit(args.limit)
        params = {"limit": str(args.limit)}
        if args.state:
            params["state"] = args.state
        if args.cursor:
            params["cursor"] = args.cursor
        return ("GET", f"{base}jobs/{job}", params, None, {})
    url = f"{base}jobs/{job}/{_segment(args.key)}"
    if action == "show":
        return ("GET", url, {}, None, {})
    if not args.reason or not args.reason.strip():
        raise _Usage(f"{action} needs --reason TEXT (it goes to the audit log)")
    extra = {"x-audit-reason": args.reason}
    try:
        args.reason.encode("latin-1")
    except UnicodeEncodeError:  # headers are bytes: send UTF-8, the API reads it as such
        extra = {"x-audit-reason": args.reason.encode("utf-8").decode("latin-1")}
    if action == "reset":
        return ("DELETE", url, {}, None, extra)
    supplied: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise _Usage(f"--header takes NAME:VALUE, got {item!r}")
        supplied[name.strip().lower()] = value.strip()
    return ("POST", url + "/reprepare", {}, {"headers": supplied} if supplied else None, extra)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 1000:
        raise _Usage(f"--limit must be 1..1000, got {limit}")


def _segment(text: str) -> str:
    """One path segment, percent-encoded; `.` and `..` too, so no URL library drops them."""
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text, safe="")


def _api_error(response: httpx.Response) -> int:
    try:
        problem = response.json()
        detail = problem.get("detail", response.text)
        code = problem.get("code", "")
    except ValueError:
        detail, code = response.text[:500], ""
    label = f"{response.status_code} {code}".strip()
    print(f"pollguard jobs: the API answered {label}: {detail}", file=sys.stderr)
    return EXIT_API_ERROR


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return log_safe(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def _episode_rows(episodes: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            e.get("key"),
            e.get("state"),
            e.get("pending_seconds"),
            e.get("attempts"),
            e.get("decision"),
            e.get("last_poll"),
            (e.get("lock") or {}).get("until"),
        ]
        for e in episodes
    ]


_EPISODE_HEADERS = (
    "KEY",
    "STATE",
    "PENDING_S",
    "ATTEMPTS",
    "DECISION",
    "LAST_POLL",
    "LOCKED_UNTIL",
)


def _print_table(action: str, documents: Sequence[dict[str, Any]]) -> None:
    if action == "list":
        episodes = [e for d in documents for e in d.get("episodes", [])]
        print(_table(_EPISODE_HEADERS, _episode_rows(episodes)))
        cursor = documents[-1].get("cursor")
        print(f"{len(episodes)} episode(s)" + (f"; more: --cursor {cursor}" if cursor else ""))
        return
    document = documents[-1]
    if action == "show":
        episode = document["episode"]
        for name, value in episode.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            print(f"{name + ':':16}{_cell(value)}")
    elif action == "reset":
        before = document.get("before") or {}
        print(
            f"reset {document['job']}/{_cell(document['key'])}: was {_cell(before.get('state'))}, "
            f"{_cell(before.get('attempts'))} attempt(s)"
        )
    elif action == "reprepare":
        print(f"re-prepare {document['outcome']}: {_cell(document['detail'])}")
        if document.get("ignored_headers"):
            print(f"headers not forwarded: {', '.join(document['ignored_headers'])}")
        if document.get("episode"):
            print(_table(_EPISODE_HEADERS, _episode_rows([document["episode"]])))
    elif action == "audit":
        rows = [
            [
                e.get("time"),
                e.get("actor"),
                e.get("action"),
                e.get("job"),
                e.get("key"),
                e.get("outcome"),
                e.get("reason"),
            ]
            for e in document.get("entries", [])
        ]
        print(_table(("TIME", "ACTOR", "ACTION", "JOB", "KEY", "OUTCOME", "REASON"), rows))
