"""The scale-out rows (bench/scaleout.py) in docs/benchmarks.md: their section and their lines
in the targets table (issue 12). Cells are medians (min–max) over rounds; ratios are taken per
round (the two sides measured back to back), then their median."""

from __future__ import annotations

import statistics
from typing import Any

TARGET_HERD_PER_WINDOW = 1.0
TARGET_REPLICA_KEY_RPS = 0.5
TARGET_TOPOLOGY_RATIO = {"cluster": 0.8, "sentinel": 0.95}
TARGET_WORKERS_RATIO = 1.6
TOPOLOGY_LABELS = {
    "standalone": "standalone",
    "cluster": "Cluster (3 masters + 3 replicas)",
    "sentinel": "Sentinel (1 master + 1 replica + 3 sentinels)",
}


def _values(data: dict[str, Any], key: str) -> list[float]:
    return [s[key] for s in data["samples"] if s.get(key) is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(values: list[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    middle = f"{statistics.median(values):,.{digits}f}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _ratios(data: dict[str, Any], top: str, bottom: str) -> list[float]:
    return [s[top] / s[bottom] for s in data["samples"] if s.get(top) and s.get(bottom)]


def _status(data: dict[str, Any], row: str) -> str | None:
    """'n/a: why' or '**error**: what' for a row that has no figures, else None."""
    if row in (data.get("unavailable") or {}):
        return f"n/a — {data['unavailable'][row]}"
    if row in (data.get("errors") or {}):
        return f"**error**: {data['errors'][row]}"
    if row not in data.get("rows", []):
        return "n/a — not selected (--scale-out)"
    return None


def target_lines(data: dict[str, Any] | None) -> list[str]:
    """Issue 12's lines for the targets table."""
    if not data:
        return []
    lines: list[str] = []

    def verdict(row: str, label: str, value: float | None, target_met: bool, detail: str) -> None:
        status = _status(data, row)
        if status is not None:
            lines.append(f"| {label} | {status} | n/a |")
        elif value is None:
            lines.append(f"| {label} | n/a | n/a |")
        else:
            lines.append(f"| {label} | {detail} | {'met' if target_met else '**missed**'} |")

    window = data["stuck_delay_ms"]
    per_window = _median(_values(data, "herd_upstream_per_window"))
    herd_rps = _median(_values(data, "herd_upstream_rps")) or 0.0
    client_rps = _median(_values(data, "herd_client_rps")) or 0.0
    verdict(
        "herd",
        f"{data['herd_pollers']:,} pollers on one stuck key, one replica: ≤ 1 upstream request "
        f"per in-flight window ({window} ms: ≤ {1000 / window:g} upstream polls/s)",
        per_window,
        per_window is not None and per_window <= TARGET_HERD_PER_WINDOW,
        f"{per_window or 0:.2f} per window ({herd_rps:,.1f} upstream vs {client_rps:,.0f} "
        "client polls/s)",
    )
    worst = _median(_values(data, "replicas_worst_key_rps"))
    interval = data["min_poll_interval_s"]
    jitter = data.get("arrival_jitter_s", 0.0)
    # The gaps are timed at the upstream: `jitter` of arrival latency is allowed (see section).
    allowed = 1 / (interval - jitter) if interval > jitter else TARGET_REPLICA_KEY_RPS
    verdict(
        "replicas",
        f"`min_poll_interval: {interval:g}s`, two replicas: ≤ {TARGET_REPLICA_KEY_RPS} upstream "
        f"polls/s per key (timed at the upstream, {jitter * 1000:.0f} ms of arrival jitter "
        f"allowed: ≤ {allowed:.3f})",
        worst,
        worst is not None and worst <= max(allowed, TARGET_REPLICA_KEY_RPS),
        f"{worst or 0:.3f} (worst key)",
    )
    for topology, target in TARGET_TOPOLOGY_RATIO.items():
        ratio = _median(
            _ratios(data, f"topo_{topology}_pending_rps", "topo_standalone_pending_rps")
        )
        unguarded = sum(_values(data, f"topo_{topology}_pending_unguarded")) + sum(
            _values(data, "topo_standalone_pending_unguarded")
        )
        caveat = f"; {unguarded:,.0f} polls unguarded (Redis calls failed)" if unguarded else ""
        verdict(
            "topologies",
            f"guarded 202 with Redis {topology.capitalize()} ≥ {target} × with standalone Redis",
            ratio,
            ratio is not None and ratio >= target,
            f"{ratio or 0:.3f} ×{caveat}",
        )
    ratio = _median(_ratios(data, "workers_2_rps", "workers_1_rps"))
    verdict(
        "workers",
        f"small GET, `--workers 2` ≥ {TARGET_WORKERS_RATIO} × one worker (unpinned)",
        ratio,
        ratio is not None and ratio >= TARGET_WORKERS_RATIO,
        f"{ratio or 0:.2f} ×",
    )
    return lines


def section(data: dict[str, Any] | None, opts: dict[str, int]) -> list[str]:
    """The scale-out section: one table per row, then how each was measured."""
    if not data:
        return []
    window = data["stuck_delay_ms"]
    seconds = opts["seconds"]
    out = ["", "## Scaling out (issue 12)", ""]

    out += ["### Herd: one stuck key, one replica", ""]
    status = _status(data, "herd")
    if status:
        out.append(status)
    else:
        out += [
            "| pollers | store | upstream answer takes | client polls/s | client p99 ms | "
            "upstream polls/s | client ÷ upstream | upstream requests per window | "
            "non-2xx / socket errors |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {data['herd_pollers']:,} | standalone Redis | {window} ms | "
            f"{_cell(_values(data, 'herd_client_rps'))} | "
            f"{_cell(_values(data, 'herd_client_p99_ms'), 1)} | "
            f"{_cell(_values(data, 'herd_upstream_rps'), 1)} | "
            f"{_cell(_values(data, 'herd_client_per_upstream'))} | "
            f"{_cell(_values(data, 'herd_upstream_per_window'), 2)} | "
            f"{sum(_values(data, 'herd_non_2xx')):,.0f} / "
            f"{sum(_values(data, 'herd_socket_errors')):,.0f} |",
        ]

    out += ["", "### Across replicas: `min_poll_interval`", ""]
    status = _status(data, "replicas")
    if status:
        out.append(status)
    else:
        out += [
            "| replicas | pollers | keys | min_poll_interval | client polls/s | upstream polls, "
            "all keys | upstream polls/s per key, worst | mean | shortest gap between a key's "
            "upstream polls, s | non-2xx / socket errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| 2 | {data['replica_pollers']:,} | {data['replica_keys']} | "
            f"{data['min_poll_interval_s']:g} s | {_cell(_values(data, 'replicas_client_rps'))} | "
            f"{_cell(_values(data, 'replicas_upstream_polls'))} in "
            f"{_cell(_values(data, 'replicas_seconds'), 1)} s | "
            f"{_cell(_values(data, 'replicas_worst_key_rps'), 3)} | "
            f"{_cell(_values(data, 'replicas_mean_key_rps'), 3)} | "
            f"{_cell(_values(data, 'replicas_shortest_gap_s'), 2)} | "
            f"{sum(_values(data, 'replicas_non_2xx')):,.0f} / "
            f"{sum(_values(data, 'replicas_socket_errors')):,.0f} |",
        ]

    out += ["", "### Redis topologies: guarded 202", ""]
    status = _status(data, "topologies")
    if status:
        out.append(status)
    else:
        out += [
            "| Redis | guarded 202 req/s | p99 ms | ÷ standalone | fresh keys 202 req/s | p99 ms | "
            "÷ standalone | Redis scripts per poll (fresh keys) | polls left unguarded | "
            "non-2xx or errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for topology, label in TOPOLOGY_LABELS.items():
            key = f"topo_{topology}_"
            versus = (
                ("", "")
                if topology == "standalone"
                else (
                    _cell(_ratios(data, key + "pending_rps", "topo_standalone_pending_rps"), 3),
                    _cell(_ratios(data, key + "fresh_rps", "topo_standalone_fresh_rps"), 3),
                )
            )
            unguarded = sum(_values(data, key + "pending_unguarded")) + sum(
                _values(data, key + "fresh_unguarded")
            )
            out.append(
                f"| {label} | {_cell(_values(data, key + 'pending_rps'))} | "
                f"{_cell(_values(data, key + 'pending_p99_ms'), 1)} | {versus[0]} | "
                f"{_cell(_values(data, key + 'fresh_rps'))} | "
                f"{_cell(_values(data, key + 'fresh_p99_ms'), 1)} | {versus[1]} | "
                f"{_cell(_values(data, key + 'scripts_per_pending'), 3)} "
                f"({_cell(_values(data, key + 'scripts_per_fresh'), 2)}) | {unguarded:,.0f} | "
                f"{sum(_values(data, key + 'bad')):,.0f} |"
            )

    out += ["", "### Workers: `pollguard serve --workers 2` (unpinned)", ""]
    status = _status(data, "workers")
    if status:
        out.append(status)
    else:
        out += [
            "| workers | small GET req/s | p99 ms | ÷ one worker | busiest worker's CPU share | "
            "foreign load (cores) | non-2xx or errors |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for workers in (1, 2):
            key = f"workers_{workers}_"
            versus = "" if workers == 1 else _cell(_ratios(data, key + "rps", "workers_1_rps"), 2)
            out.append(
                f"| {workers} | {_cell(_values(data, key + 'rps'))} | "
                f"{_cell(_values(data, key + 'p99_ms'), 2)} | {versus} | "
                f"{_cell(_values(data, key + 'busiest_share'), 2) if workers > 1 else ''} | "
                f"{_cell(_values(data, key + 'foreign_cores'), 2)} | "
                f"{sum(_values(data, key + 'bad')):,.0f} |"
            )

    out += [
        "",
        f"Every row runs {opts.get('rounds', 1)} time(s), after the peers, with wrk "
        f"`-t1 -d{seconds}s`. **Herd**: one pollguard (pinned to the proxy core, standalone "
        "Redis store, `coalesce` on as by default) in front of bench/apps/herd_upstream.py, "
        f"which answers `/stuck/<key>` with `202` + `Retry-After: 2` after {window} ms and counts "
        f"the polls it receives; wrk with {data['herd_pollers']:,} connections polls one key. "
        f"The in-flight window is those {window} ms: a replica sending at most one upstream "
        f"request per window sends at most {1000 / window:g} per second; upstream requests per "
        "window = upstream polls/s × the window (≤ 1). Client polls/s is wrk's rate, upstream "
        "polls/s the upstream's count over wrk's duration. **Across replicas**: two pollguards "
        f"on one standalone Redis with `min_poll_interval: {data['min_poll_interval_s']:g}s`, "
        f"one wrk of {data['replica_pollers'] // 2} connections each, both over the same "
        f"{data['replica_keys']} stuck keys (new keys each round); a key's upstream polls/s is "
        "1 ÷ the mean gap between the upstream's polls of it, from its first poll on (a count "
        "÷ the window would count a poll at each end); the row runs at least "
        f"{data.get('replica_min_seconds', 0)} s so each key shows two gaps. The shield makes "
        "a gap one interval long in Redis's clock, from one claim to the next; the upstream "
        "sees each poll some ms after its claim, so a gap timed there is the interval ± the "
        "difference of two such latencies, and the check allows "
        f"{data.get('arrival_jitter_s', 0) * 1000:.0f} ms of it. **Topologies**: one pollguard each on "
        "standalone Redis, Redis Cluster (3 masters + 3 replicas, `redis-cli --cluster "
        "create`) and Sentinel (1 master + 1 replica + 3 sentinels, quorum 2), all Redis "
        "processes on the load core; rotating order; data flushed before each. A fresh-key "
        "warm-up first (the client maps the cluster, asks the sentinels), then the peers' "
        "guarded 202 load (32 connections over 1,000 keys: most polls are answered from the "
        "replica's remembered records) and keys never polled before (bench/fresh_keys.lua: "
        "every poll one Redis round trip). Redis scripts per poll: EVAL/EVALSHA calls "
        "(`INFO commandstats` deltas over the masters) ÷ requests, the polls that reached "
        "Redis. Polls left unguarded: failed Redis calls and "
        "breaker skips (`pollguard_store_errors_total` + `pollguard_store_skipped_total`); "
        "such a run measured `state.on_error: pass`, not the topology. **Workers**: `python -m "
        "proxy serve --workers N` (standalone Redis store, as `--workers 2` needs, for both), "
        "wrk on `/small` with 32 connections; nothing pinned, in front of a second, unpinned "
        "nginx upstream; ÷ one worker per round. Busiest worker's CPU share: its utime+stime "
        "over the run ÷ all workers' (0.5: the kernel spread the connections evenly).",
    ]
    return out
