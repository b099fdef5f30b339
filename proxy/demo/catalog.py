"""The simulator's fixed world: tenants, their tokens, their calls, and each call's recording bytes.

Everything here is deterministic so a client (or a test) can recompute what it should receive."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

TENANT_TOKENS: dict[str, str] = {"alice-token": "alice", "bob-token": "bob"}
CALLS_PER_TENANT = 64
DEFAULT_RECORDING_SIZE = 256 * 1024
_BLOCK_SIZE = hashlib.sha256().digest_size


@dataclass(frozen=True)
class Call:
    """One seeded call. `has_recording_url` False mimics calls the telephony side never recorded."""

    call_sid: str
    tenant: str
    has_recording_url: bool


def call_sid_for(tenant: str, index: int) -> str:
    """The deterministic call_sid of `tenant`'s call number `index` (matches ^CA[0-9a-f]{32}$)."""
    digest = hashlib.sha256(f"pollguard-demo:{tenant}:{index}".encode()).hexdigest()
    return "CA" + digest[:32]


def unrecorded_call_sid(tenant: str) -> str:
    """A call of `tenant` that exists but has no recording URL (the backend answers 404)."""
    return call_sid_for(tenant, CALLS_PER_TENANT)


def token_for(tenant: str) -> str:
    """The bearer token / session cookie value that authenticates as `tenant`."""
    for token, owner in TENANT_TOKENS.items():
        if owner == tenant:
            return token
    raise KeyError(tenant)


def seeded_calls() -> dict[str, Call]:
    """Every seeded call by call_sid: CALLS_PER_TENANT recorded ones, one unrecorded per tenant."""
    calls: dict[str, Call] = {}
    for tenant in TENANT_TOKENS.values():
        for index in range(CALLS_PER_TENANT):
            sid = call_sid_for(tenant, index)
            calls[sid] = Call(call_sid=sid, tenant=tenant, has_recording_url=True)
        sid = unrecorded_call_sid(tenant)
        calls[sid] = Call(call_sid=sid, tenant=tenant, has_recording_url=False)
    return calls


@lru_cache(maxsize=256)
def recording_bytes(call_sid: str, size: int) -> bytes:
    """The first `size` bytes of `call_sid`'s recording: SHA-256 in counter mode, so any prefix
    of a longer recording is the shorter recording and a client can verify any slice."""
    blocks = (size + _BLOCK_SIZE - 1) // _BLOCK_SIZE
    seed = call_sid.encode()
    stream = b"".join(
        hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() for counter in range(blocks)
    )
    return stream[:size]
