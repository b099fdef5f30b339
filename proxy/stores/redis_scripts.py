"""Lua scripts run with EVALSHA, falling back to SCRIPT LOAD + one retry when Redis says NOSCRIPT.

Redis keeps loaded scripts only until a restart, a failover or SCRIPT FLUSH, so NOSCRIPT is rare
and the normal path is one EVALSHA. redis-py's `Script` objects would handle it for us, but in a
pipeline they make redis-py send SCRIPT EXISTS before every pipeline (`Pipeline.load_scripts`):
a second round trip per batch on the guarded path, and a second wait when Redis hangs. Here a
pipeline is EVALSHA commands only; the calls that came back NOSCRIPT run once more after one load.
The same works on a RedisCluster: its pipeline sends one batch per master and returns each
reply in place, and its SCRIPT LOAD goes to every master. A cluster pipeline also returns a
connection that broke mid-batch (a master killed or restarted) as each call's result, and then
does not map the cluster again, as its single commands do (and retry once): those calls run
again one by one, which is how a batch finds a promoted replica.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Per-call results of a cluster pipeline that mean "the connection broke", not "Redis answered".
_BROKEN = (RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: str
    sha: str  # what Redis names it: the SHA1 of the source, in hex


def lua_script(source: str) -> LuaScript:
    return LuaScript(source=source, sha=hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class ScriptCall:
    key: str  # the one key the script touches (KEYS[1])
    args: Sequence[str]  # ARGV


async def run_script(client: Redis | RedisCluster, script: LuaScript, call: ScriptCall) -> Any:
    """One EVALSHA (two and a SCRIPT LOAD after a NOSCRIPT)."""
    try:
        return await client.evalsha(script.sha, 1, call.key, *call.args)
    except NoScriptError:
        await client.script_load(script.source)
        return await client.evalsha(script.sha, 1, call.key, *call.args)


async def run_script_batch(
    client: Redis | RedisCluster, script: LuaScript, calls: Sequence[ScriptCall]
) -> list[Any]:
    """One pipeline of EVALSHA, not a transaction; each call's result or error, in order.

    Redis error replies come back as exception objects in the list, so one bad record fails
    only its own call. Connection errors and timeouts raise; on a cluster, those of one
    master's connection come back in its calls' results when running them again alone failed.
    """
    results = await _pipelined(client, script, calls)
    missing = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        await client.script_load(script.source)
        again = await _pipelined(client, script, [calls[index] for index in missing])
        for index, result in zip(missing, again, strict=True):
            results[index] = result
    if isinstance(client, RedisCluster):
        # Alone, each goes through redis-py's single-command path: a broken connection there
        # maps the cluster again and retries once (proxy.stores.redis_topology).
        broken = [index for index, result in enumerate(results) if isinstance(result, _BROKEN)]
        if broken:
            alone = await asyncio.gather(
                *(run_script(client, script, calls[index]) for index in broken),
                return_exceptions=True,
            )
            for index, result in zip(broken, alone, strict=True):
                results[index] = result
    return results


async def _pipelined(
    client: Redis | RedisCluster, script: LuaScript, calls: Sequence[ScriptCall]
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        # execute_command, not pipe.evalsha: a RedisCluster pipeline blocks its evalsha method
        # (a script may touch keys of several slots), but routes a raw EVALSHA by its KEYS,
        # and ours have one key, so one slot. Queued: the pipeline returns itself.
        pipe.execute_command("EVALSHA", script.sha, 1, call.key, *call.args)
    return await pipe.execute(raise_on_error=False)
