"""RFC 9457 problem documents: the only error bodies pollguard itself writes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

PROBLEM_CONTENT_TYPE = b"application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:pollguard:problem:"

TITLES: Mapping[str, str] = {
    "upstream-unavailable": "Upstream unavailable",
    "upstream-timeout": "Upstream timed out",
    "upstream-invalid": "Invalid upstream response",
    "upstream-busy": "Upstream connections exhausted",
    "client-timeout": "Request body not received in time",
    "shutting-down": "Shutting down",
    "request-head-too-large": "Request header fields too large",
    "job-stuck": "Job is stuck",
    "wait-exceeded": "Waited too long for the job",
    "reprepare-failed": "Re-preparing the job failed",
    "state-unavailable": "Job state store unavailable",
    "not-found": "Not found",
    "unauthorized": "Unauthorized",
    "dependency-unavailable": "Dependency unavailable",
    "bad-request": "Bad request",
    "internal-error": "Internal error",
    "admin-disabled": "Admin endpoint disabled",
    "invalid-config": "Invalid config",
    "reload-unavailable": "Reload unavailable",
}


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    code: str
    detail: str
    retry_after: int | None = None
    extensions: Mapping[str, object] = field(default_factory=dict)

    def body(self, request_id: str) -> bytes:
        document: dict[str, object] = {
            "type": PROBLEM_TYPE_PREFIX + self.code,
            "title": TITLES.get(self.code, self.code),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "request_id": request_id,
            **self.extensions,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def headers(self, body: bytes, request_id: bytes) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-request-id", request_id),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers
