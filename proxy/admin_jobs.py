"""The admin API's job endpoints: list, show, reset and re-prepare episodes; read the audit log.

Mounted by proxy.admin under `admin.prefix`; never on the forwarding path. Every endpoint needs
`Authorization: Bearer <token>` with one of `admin.tokens` (403 admin-disabled when none is
configured, 401 unauthorized otherwise); writes need an `X-Audit-Reason` and are audited (a
`pollguard.audit` log line and an entry in the store's capped audit log).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.episodes import EpisodeState, episode_view, record_state, rfc3339
from proxy.errors import StoreUnavailable
from proxy.guard import GuardedJob, JobGuard
from proxy.headers import NEVER_FORWARDED_ON_REPREPARE, sane_request_id
from proxy.keyparams import NeedsParams, params_from_key
from proxy.logtext import log_safe
from proxy.problems import Problem
from proxy.routes import is_guardable_key, template_params
from proxy.stores.base import START_CURSOR, EpisodeRecord

audit_logger = logging.getLogger("pollguard.audit")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_REASON_CHARS = 500
MAX_BODY_BYTES = 16 * 1024
# SCAN steps one listing request makes at most before answering with the cursor reached.
MAX_SCAN_STEPS = 8
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEADER_VALUE_BAD = re.compile(r"[\x00\r\n]")
_FIELD_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_STATES = frozenset(str(state) for state in EpisodeState)


class ProblemError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


def _fail(status: int, code: str, detail: str) -> ProblemError:
    return ProblemError(Problem(status, code, detail))


@dataclass(frozen=True)
class JobsApi:
    """What the job endpoints work on. `guard` is None when no routes are configured: then
    every job is unknown."""

    prefix: str
    tokens: Mapping[str, str]
    guard: JobGuard | None
    clock: Callable[[], float] = time.time
    _expected: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._expected.extend(
            (name, f"Bearer {token}".encode()) for name, token in self.tokens.items()
        )

    def actor(self, request: Request) -> str | None:
        """The name of the token the request carries, or None. Compared with every token."""
        given = request.headers.get("authorization", "").encode("latin-1")
        found: str | None = None
        for name, expected in self._expected:
            if hmac.compare_digest(given, expected):
                found = name
        return found

    # --- endpoints -------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        """Everything under {prefix}jobs/: dispatched on the raw path's parts."""
        return await self._run(request, self._dispatch)

    async def audit(self, request: Request) -> Response:
        return await self._run(request, self._audit)

    async def _run(self, request: Request, handler: Callable[..., Any]) -> Response:
        try:
            actor = self._authorize(request)
            result: Response = await handler(request, actor)
            return result
        except ProblemError as exc:
            return problem_response(exc.problem, request)
        except StoreUnavailable as exc:
            return problem_response(Problem(503, "store-unavailable", str(exc)), request)

    def _authorize(self, request: Request) -> str:
        if not self._expected:
            raise _fail(
                403,
                "admin-disabled",
                "the job admin API is off: configure admin.tokens (or admin.token) to use it",
            )
        actor = self.actor(request)
        if actor is None:
            raise _fail(401, "unauthorized", "send Authorization: Bearer <one of admin.tokens>")
        return actor

    async def _dispatch(self, request: Request, actor: str) -> Response:
        parts = _path_parts(request, self.prefix)
        method = request.method
        if len(parts) == 2 and method == "GET":
            return await self._list(request, parts)
        if len(parts) == 3 and method in ("GET", "DELETE"):
            return await self._episode(request, actor, parts)
        if len(parts) == 4 and parts[3] == "reprepare" and method == "POST":
            return await self._reprepare(request, actor, parts)
        raise _fail(404, "not-found", f"no pollguard endpoint for {method} {request.url.path}")

    async def _list(self, request: Request, parts: list[str]) -> Response:
        guard, job = self._job(parts[1])
        wanted = request.query_params.get("state")
        if wanted is not None and wanted not in _STATES:
            raise _fail(400, "bad-request", "state must be one of pending, stuck, terminal")
        limit = _limit(request)
        cursor: str | None = request.query_params.get("cursor") or START_CURSOR
        episodes: list[dict[str, Any]] = []
        invalid = 0
        steps = 0
        while cursor is not None and len(episodes) < limit and steps < MAX_SCAN_STEPS:
            steps += 1
            try:
                page = await guard.store.scan(job.name, cursor, limit - len(episodes), self.clock())
            except ValueError:
                raise _fail(
                    400, "bad-request", "invalid cursor: pass one a listing returned"
                ) from None
            now = self.clock()
            for record in page.records:
                if wanted is None or record_state(record, job.limits, now) == wanted:
                    episodes.append(episode_view(record, job.limits, now))
            invalid += page.invalid
            cursor = page.cursor
        body = {
            "job": job.name,
            "state": wanted,
            "limit": limit,
            "episodes": episodes,
            "cursor": cursor,
            "unreadable_keys": invalid,
        }
        return _json(body)

    async def _episode(self, request: Request, actor: str, parts: list[str]) -> Response:
        method = request.method
        guard, job = self._job(parts[1])
        key = self._key(job, parts[2])
        if method == "GET":
            record = await guard.store.read(job.name, key, self.clock())
            if record is None:
                raise _no_episode(job.name, key)
            return _json(
                {"job": job.name, "episode": episode_view(record, job.limits, self.clock())}
            )
        reason = _reason(request)
        before = await guard.store.reset(job.name, key, self.clock())
        guard.forget_local(job.name, key)
        if before is None:
            raise _no_episode(job.name, key)
        before_view = episode_view(before, job.limits, self.clock())
        stored = await self._record_audit(
            request, actor, "reset", job.name, key, reason, before_view, None
        )
        return _json(
            {"job": job.name, "key": key, "reset": True, "before": before_view, "audited": stored}
        )

    async def _reprepare(self, request: Request, actor: str, parts: list[str]) -> Response:
        guard, job = self._job(parts[1])
        key = self._key(job, parts[2])
        reason = _reason(request)
        supplied = await _supplied_headers(request)
        allowed = {
            name
            for name in job.reprepare.forward_headers
            if name.encode("ascii") not in NEVER_FORWARDED_ON_REPREPARE
        }
        forwarded = sorted(name for name in supplied if name in allowed)
        ignored = sorted(name for name in supplied if name not in allowed)
        try:
            # The routes guarded now: a config reload may have swapped them.
            routes = guard.rules.routes.specs
            params = params_from_key(routes, job.name, key, template_params(job.reprepare.path))
        except NeedsParams as exc:
            raise _fail(409, "reprepare-needs-params", str(exc)) from None
        headers = [(name.encode("ascii"), supplied[name].encode("latin-1")) for name in forwarded]
        request_id = sane_request_id(request.headers.get("x-request-id", "").encode() or None)
        outcome = await guard.force_reprepare(job.name, key, params, headers, request_id)
        now = self.clock()
        before_view = episode_view(
            EpisodeRecord(job.name, key, outcome.before, None, None), job.limits, now
        )
        if outcome.outcome not in ("succeeded", "failed"):
            raise _fail(409, outcome.outcome, outcome.detail)
        after = await guard.store.read(job.name, key, now)
        after_view = None if after is None else episode_view(after, job.limits, now)
        stored = await self._record_audit(
            request,
            actor,
            "reprepare",
            job.name,
            key,
            reason,
            before_view,
            after_view,
            outcome=outcome.outcome,
            detail=outcome.detail,
        )
        body = {
            "outcome": outcome.outcome,
            "detail": outcome.detail,
            "attempt": outcome.attempts,
            "forwarded_headers": forwarded,
            "ignored_headers": ignored,
            "episode": after_view,
            "audited": stored,
        }
        return _json(body)

    async def _audit(self, request: Request, actor: str) -> Response:
        limit = _limit(request)
        if self.guard is None:
            return _json({"entries": []})
        entries = await self.guard.store.audit_read(limit)
        return _json({"entries": entries})

    # --- helpers ---------------------------------------------------------------------------

    def _job(self, name: str) -> tuple[JobGuard, GuardedJob]:
        job = None if self.guard is None else self.guard.jobs.get(name)
        if self.guard is None or job is None:
            known = ", ".join(sorted(self.guard.jobs)) if self.guard is not None else "none"
            raise _fail(404, "unknown-job", f"no job {log_safe(name)!r} (configured: {known})")
        return self.guard, job

    def _key(self, job: GuardedJob, key: str) -> str:
        if not key or _CONTROL.search(key) or not is_guardable_key(key, job.key_pattern):
            raise _fail(
                400,
                "bad-request",
                f"{log_safe(key[:80])!r} is not a key job {job.name} can track (at most 256 "
                "bytes of UTF-8, no control characters, and the job's key_pattern)",
            )
        return key

    async def _record_audit(
        self,
        request: Request,
        actor: str,
        action: str,
        job: str,
        key: str,
        reason: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        **extra: str,
    ) -> bool:
        """Log the write and append it to the store's audit log; False when the store refused
        the entry (the log line is written regardless)."""
        client = request.client.host if request.client is not None else None
        entry: dict[str, Any] = {
            "time": rfc3339(self.clock()),
            "actor": actor,
            "client_ip": client,
            "action": action,
            "job": job,
            "key": key,
            "reason": reason,
            "before": before,
            "after": after,
            **extra,
        }
        audit_logger.info(
            "admin %s job=%s key=%s actor=%s client_ip=%s reason=%s",
            action,
            job,
            log_safe(key),
            actor,
            client,
            log_safe(reason),
            extra={f"audit_{name}": value for name, value in entry.items()},
        )
        assert self.guard is not None
        try:
            await self.guard.store.audit_append(entry)
        except StoreUnavailable as exc:
            audit_logger.warning("audit entry not stored: %s", exc)
            return False
        return True


def _no_episode(job: str, key: str) -> ProblemError:
    return _fail(404, "no-episode", f"job {job} has no episode for key {log_safe(key)!r}")


def _path_parts(request: Request, prefix: str) -> list[str]:
    """The path after the prefix (`jobs/<job>/<key>...`), split on the raw `/` and each part
    percent-decoded as UTF-8, so a key may hold an encoded `/`."""
    raw: bytes | None = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(request.scope["path"])
    encoded_prefix = quote(prefix)
    if not path.startswith(encoded_prefix):
        raise _fail(400, "bad-request", "the admin prefix must be sent unencoded")
    rest = path[len(encoded_prefix) :]
    parts: list[str] = []
    for part in rest.split("/"):
        try:
            parts.append(unquote_to_bytes(part).decode("utf-8"))
        except UnicodeDecodeError:
            raise _fail(400, "bad-request", "the path is not percent-encoded UTF-8") from None
    return parts


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise _fail(400, "bad-request", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _reason(request: Request) -> str:
    raw = request.headers.get("x-audit-reason")
    if raw is None or not raw.strip():
        raise _fail(
            400,
            "audit-reason-required",
            "writes need an X-Audit-Reason header saying why (it goes to the audit log)",
        )
    try:  # header bytes arrive as latin-1; a UTF-8 reason is read as UTF-8
        reason = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        reason = raw
    if len(reason) > MAX_REASON_CHARS or _CONTROL.search(reason):
        raise _fail(
            400,
            "audit-reason-required",
            f"X-Audit-Reason must be at most {MAX_REASON_CHARS} characters without control "
            "characters",
        )
    return reason.strip()


async def _supplied_headers(request: Request) -> dict[str, str]:
    """The optional body `{"headers": {name: value}}` (at most MAX_BODY_BYTES)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _fail(413, "payload-too-large", f"the body may be at most {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _fail(413, "payload-too-large", f"the body may be at most {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        document = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise _fail(400, "bad-request", "the body must be JSON") from None
    if not isinstance(document, dict) or set(document) - {"headers"}:
        raise _fail(400, "bad-request", 'the body must look like {"headers": {"name": "value"}}')
    headers = document.get("headers", {})
    if not isinstance(headers, dict):
        raise _fail(400, "bad-request", '"headers" must be an object of strings')
    supplied: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if not isinstance(value, str) or not _FIELD_NAME.match(lowered):
            raise _fail(400, "bad-request", f"header {log_safe(name)!r} is not a valid header")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise _fail(400, "bad-request", f"header {lowered} holds non-latin-1 text") from None
        if _HEADER_VALUE_BAD.search(value):
            raise _fail(400, "bad-request", f"header {lowered} holds CR, LF or NUL")
        supplied[lowered] = value
    return supplied


def _json(body: Mapping[str, Any], status: int = 200) -> Response:
    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})


def problem_response(problem: Problem, request: Request) -> Response:
    from proxy.admin import _problem_response  # admin imports this module

    return _problem_response(problem, request)
