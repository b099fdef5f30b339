"""state.redis_mode and its fields: validation at load, check-config rendering, --workers, and
the store the app builds for each mode (no Redis needed: clients connect lazily)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app import PollguardApp, redis_topology
from proxy.config import Config, parse_config
from proxy.config_report import check_workers, render_config
from proxy.errors import ConfigError
from proxy.stores import RedisJobStore, create_store
from proxy.stores.redis_topology import RedisTopology

BASE = (
    "upstream: {url: 'http://127.0.0.1:9'}\n"
    "jobs: {recording: {reprepare: {path: '/p/{id}'}}}\n"
    "routes: [{path: '/f/{id}', job: recording}]\n"
)


def parse_state(state: dict[str, Any]) -> Config:
    return parse_config(BASE + yaml.safe_dump({"state": state}), env={}, source="config.yaml")


def error_of(state: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_state(state)
    return str(caught.value)


def test_standalone_is_the_default() -> None:
    state = parse_state({"redis_url": "redis://127.0.0.1:6379/0"}).state
    assert state.redis_mode == "standalone" and state.uses_redis
    assert redis_topology(state) is None
    assert not parse_state({}).state.uses_redis


def test_cluster_accepts_a_url_or_nodes() -> None:
    by_url = parse_state({"redis_mode": "cluster", "redis_url": "redis://10.0.0.1:7000"}).state
    by_nodes = parse_state({"redis_mode": "cluster", "redis_nodes": ["a:7000", "[::1]:7001"]})
    assert by_url.uses_redis and by_nodes.state.uses_redis
    assert redis_topology(by_nodes.state) == RedisTopology(
        "cluster", nodes=("a:7000", "[::1]:7001")
    )


def test_sentinel_accepts_sentinels_and_service() -> None:
    state = parse_state(
        {
            "redis_mode": "sentinel",
            "sentinels": ["127.0.0.1:26379", "h2:26379"],
            "sentinel_service": "mymaster",
            "redis_url": "rediss://u:pw@ignored:1/2",
        }
    ).state
    assert state.uses_redis
    assert redis_topology(state) == RedisTopology(
        "sentinel",
        url="rediss://u:pw@ignored:1/2",
        sentinels=("127.0.0.1:26379", "h2:26379"),
        service="mymaster",
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"redis_mode": "cluster"}, "config.yaml: state.redis_url: redis_mode is cluster, but"),
        (
            {"redis_mode": "cluster", "redis_url": "redis://h:7000/3"},
            "config.yaml: state.redis_url: 'redis://h:7000/3' can't address a Redis Cluster",
        ),
        (
            {"redis_mode": "sentinel", "sentinel_service": "m"},
            "config.yaml: state.sentinels: redis_mode is sentinel, but no sentinels",
        ),
        (
            {"redis_mode": "sentinel", "sentinels": ["h:26379"]},
            "config.yaml: state.sentinel_service: redis_mode is sentinel, but sentinel_service",
        ),
        (
            {"redis_mode": "sentinel", "sentinels": ["h"], "sentinel_service": "m"},
            "config.yaml: state.sentinels: invalid address 'h' — use host:port",
        ),
        (
            {"redis_mode": "sentinel", "sentinels": ["h:99999"], "sentinel_service": "m"},
            "config.yaml: state.sentinels: invalid address 'h:99999'",
        ),
        (
            {"redis_mode": "cluster", "redis_nodes": []},
            "config.yaml: state.redis_nodes: empty — list at least one host:port",
        ),
        (
            {"redis_url": "redis://h:1", "redis_nodes": ["h:7000"]},
            "config.yaml: state.redis_nodes: set, but redis_mode is standalone",
        ),
        (
            {"redis_mode": "cluster", "redis_url": "redis://h:1", "sentinels": ["h:26379"]},
            "config.yaml: state.sentinels: set, but redis_mode is cluster",
        ),
        (
            {"redis_url": "redis://h:1", "sentinel_service": "m"},
            "config.yaml: state.sentinel_service: set, but redis_mode is standalone",
        ),
        ({"redis_mode": "replicated"}, "config.yaml: state.redis_mode:"),
    ],
)
def test_invalid_topologies_name_the_field(state: dict[str, Any], expected: str) -> None:
    message = error_of(state)
    assert expected in message, message


def test_check_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "state: {redis_mode: sentinel, sentinel_service: m}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "state.sentinels" in result.stderr


def test_several_workers_accept_any_redis_mode() -> None:
    check_workers(parse_state({"redis_mode": "cluster", "redis_nodes": ["h:7000"]}), 4)
    check_workers(
        parse_state({"redis_mode": "sentinel", "sentinels": ["h:1"], "sentinel_service": "m"}), 4
    )
    with pytest.raises(ConfigError, match=r"state\.redis_url: not set, but 4 workers"):
        check_workers(parse_state({}), 4)


def test_rendering_shows_the_topology_with_passwords_masked() -> None:
    cfg = parse_state(
        {
            "redis_mode": "cluster",
            "redis_url": "rediss://pg:hunter2@10.0.0.1:7000",
            "redis_nodes": ["10.0.0.2:7000"],
        }
    )
    text = render_config(cfg)
    assert "hunter2" not in text
    state = yaml.safe_load(text)["state"]
    assert state["redis_mode"] == "cluster"
    assert state["redis_url"] == "rediss://pg:***@10.0.0.1:7000"
    assert state["redis_nodes"] == ["10.0.0.2:7000"]
    sentinel = yaml.safe_load(
        render_config(
            parse_state(
                {"redis_mode": "sentinel", "sentinels": ["h:26379"], "sentinel_service": "m"}
            )
        )
    )["state"]
    assert (sentinel["sentinels"], sentinel["sentinel_service"]) == (["h:26379"], "m")
    plain = parse_state({"redis_mode": "cluster", "redis_nodes": ["h:7000", "h:7001"]})
    assert parse_config(render_config(plain), env={}) == plain  # loads back


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
async def test_the_app_builds_a_redis_store_for_each_mode(mode: str) -> None:
    state: dict[str, Any] = {"redis_mode": mode, "timeout": "125ms", "breaker_cooldown": "3500ms"}
    if mode == "cluster":
        state["redis_nodes"] = ["127.0.0.1:1"]
    else:
        state |= {"sentinels": ["127.0.0.1:1"], "sentinel_service": "m"}
    app = PollguardApp(parse_state(state))
    await app.startup()
    try:
        assert isinstance(app.store, RedisJobStore)
        assert (app.store.timeout, app.store.breaker_cooldown) == (0.125, 3.5)
    finally:
        await app.shutdown()


@pytest.mark.anyio
async def test_create_store_without_url_but_with_a_topology_is_redis() -> None:
    store = create_store(
        None, "p:", 0.25, topology=RedisTopology("sentinel", sentinels=("h:1",), service="m")
    )
    try:
        assert isinstance(store, RedisJobStore)
    finally:
        await store.close()
