"""`pollguard sweep --config FILE [--dry-run]`: one sweeper pass (proxy.sweeper), now.

For an operator after an outage, or a cron job where replicas run without `sweep`: every job
with `sweep` configured is swept once, without waiting for (or taking) the replicas' lease — the
compare-and-set on each key still lets only one of them, this command or a replica, re-prepare
it. One line per key picked on stdout; exit 0, 1 when the store is unavailable, 2 for a bad
config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from proxy.clihelp import DefaultsHelpFormatter
from proxy.config import Config, load_config
from proxy.errors import ConfigError, StoreUnavailable
from proxy.logtext import log_safe
from proxy.sweeper import SweptKey, sweep_settings

EXIT_STORE_UNAVAILABLE = 1
EXIT_CONFIG_ERROR = 2
# Records one scan step reads (as the jobs gauge's, proxy.admin_wiring).
SCAN_STEP = 1000


def add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="re-prepare stuck keys nobody polls, once (jobs.<name>.sweep)",
        description="One sweeper pass over every job with `sweep` configured: each key "
        "unpolled for sweep.idle_after that a poll would now re-prepare is re-prepared (the "
        "same lock, budget and idempotency key as a poll's; sweep.headers as credentials). "
        "Prints one line per key: job, key, idle and pending seconds, the action taken. Exit 0, "
        "1 when the store is unavailable, 2 for a bad config.",
        formatter_class=DefaultsHelpFormatter,
    )
    sweep.add_argument("--config", help="config file (default: $POLLGUARD_CONFIG)")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="list the keys a pass would re-prepare; send nothing, change nothing",
    )
    sweep.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    path: str | None = args.config or os.environ.get("POLLGUARD_CONFIG")
    if not path:
        print(
            "pollguard sweep: no config — pass --config PATH or set POLLGUARD_CONFIG",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"pollguard: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not sweep_settings(config.jobs):
        print("pollguard sweep: no job has sweep configured; nothing to do", file=sys.stderr)
        return 0
    if not config.state.uses_redis:
        print(
            "pollguard sweep: state is in process memory (no state.redis_url), so this "
            "command's store is empty; a running pollguard sweeps its own",
            file=sys.stderr,
        )
    try:
        swept = asyncio.run(sweep_once(config, dry_run=args.dry_run))
    except StoreUnavailable as exc:
        print(f"pollguard sweep: job state store unavailable: {exc}", file=sys.stderr)
        return EXIT_STORE_UNAVAILABLE
    for key in swept:
        print(describe(key))
    print(
        f"pollguard sweep: {len(swept)} key(s) {'would be ' if args.dry_run else ''}swept",
        file=sys.stderr,
    )
    return 0


def describe(swept: SweptKey) -> str:
    """One stdout line: the decision log's key=value form, the action (may hold spaces) last."""
    detail = f" detail={log_safe(swept.detail)}" if swept.detail else ""
    return (
        f"job={swept.job} key={log_safe(swept.key)} idle_seconds={swept.idle_seconds:.1f} "
        f"pending_seconds={swept.pending_seconds:.1f}{detail} action={swept.action}"
    )


async def sweep_once(config: Config, *, dry_run: bool) -> list[SweptKey]:
    """One pass with the guard `serve` would build from `config`; StoreUnavailable propagates."""
    from proxy.app import guard_rules, redis_topology, upstream_tls_context  # only when run
    from proxy.guard import JobGuard
    from proxy.reprepare import Repreparer
    from proxy.stores import create_store
    from proxy.sweeper import Sweeper

    state = config.state
    store = create_store(
        state.redis_url,
        state.key_prefix,
        state.timeout,
        breaker_cooldown=state.breaker_cooldown,
        memory_max_records=state.memory_max_records,
        topology=redis_topology(state),
    )
    https = config.upstream.is_https
    repreparer = Repreparer(
        config.upstream.url,
        connect_timeout=config.upstream.connect_timeout,
        ssl_context=upstream_tls_context(config),
        server_hostname=config.upstream.tls.server_name if https else None,
    )
    guard = JobGuard(*guard_rules(config), store, repreparer, fail_closed=True)
    settings = sweep_settings(config.jobs)
    sweeper = Sweeper(guard, lambda: settings, scan_step=SCAN_STEP)
    try:
        return await sweeper.run_once(dry_run=dry_run, lease=False)
    finally:
        await guard.settled()
        await repreparer.close()
        await store.close()
