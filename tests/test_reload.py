"""Config reload: which fields a reload applies or reports, the guard's swap in-process, and
SIGHUP / POST reload against real `pollguard serve` processes (one worker and two)."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.app import PollguardApp, guard_rules
from proxy.config import Config, parse_config
from proxy.guard import NEEDS_STORE, GuardedPoll
from proxy.metrics import REGISTRY
from proxy.reload import MAX_CONFIG_BYTES, Reloader, plan_reload, restart_required
from tests.conftest import RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ProxyProcess, ThreadedServer, running_proxy
from tests.test_guard import CALL, in_process_guard

TOKEN = "reload-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}
UPSTREAM = "http://127.0.0.1:9"


def config_dict(**job: object) -> dict[str, Any]:
    config = guard_config(UPSTREAM, **job)
    config["admin"] = {"token": TOKEN}
    return config


def load(data: dict[str, Any]) -> Config:
    return parse_config(yaml.safe_dump(data), env={})


def changed(path: str, value: object) -> dict[str, Any]:
    """config_dict() with the dotted `path` set to `value`."""
    data = config_dict()
    *parents, last = path.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return data


# ---- which fields need a restart (pure) -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("jobs.recording.stuck_after", "5s", []),
        ("jobs.recording.reprepare.timeout", "3s", []),
        ("upstream.url", "http://127.0.0.1:10", ["upstream.url"]),
        ("upstream.read_timeout", "9s", ["upstream.read_timeout"]),
        ("server.port", 9999, ["server.port"]),
        ("server.workers", 3, ["server.workers"]),
        ("state.redis_url", "redis://127.0.0.1:6379/0", ["state.redis_url"]),
        ("state.key_prefix", "other:", ["state.key_prefix"]),
        ("admin.prefix", "/_admin/", ["admin.prefix"]),
        ("admin.token", "another-secret", ["admin.token"]),
        ("websocket.ping_interval", "7s", ["websocket.ping_interval"]),
        ("logging.format", "json", ["logging.format"]),
    ],
)
def test_restart_required_names_each_changed_field_outside_jobs_and_routes(
    path: str, value: object, expected: list[str]
) -> None:
    assert restart_required(load(config_dict()), load(changed(path, value))) == expected


def test_restart_required_lists_every_field_and_never_a_value() -> None:
    new = changed("admin.token", "s3cret-value")
    new["upstream"]["url"] = "http://127.0.0.1:10"
    new["server"] = {"port": 9999, "access_log": True}
    new["routes"] = new["routes"][:1]
    fields = restart_required(load(config_dict()), load(new))
    assert fields == ["upstream.url", "server.port", "server.access_log", "admin.token"]
    assert not any("s3cret" in field or TOKEN in field for field in fields)
    https = changed("upstream.url", "https://127.0.0.1:9")
    insecure = copy.deepcopy(https)
    insecure["upstream"]["tls"] = {"verify": False}
    assert restart_required(load(https), load(insecure)) == ["upstream.tls.verify"]


def test_plan_applies_jobs_and_routes_and_keeps_the_rest() -> None:
    running = load(config_dict(stuck_after="30s"))
    new_data = config_dict(stuck_after="1s")
    new_data["upstream"]["url"] = "http://127.0.0.1:10"
    new_data["jobs"]["other"] = copy.deepcopy(new_data["jobs"]["recording"])
    plan = plan_reload(running, load(new_data), guarded=True)
    assert plan.result == "reloaded"
    assert set(plan.jobs) == {"recording (changed)", "other (added)"}
    assert plan.restart_required == ("upstream.url",)
    assert plan.effective.upstream.url == UPSTREAM  # still the running one
    assert plan.effective.jobs["recording"].stuck_after == 1.0
    # The same file again: the fields needing a restart are still reported, nothing changes.
    again = plan_reload(plan.effective, load(new_data), guarded=True)
    assert (again.result, again.restart_required) == ("unchanged", ("upstream.url",))


def test_plan_removing_a_job_and_its_routes() -> None:
    running = load(config_dict())
    plan = plan_reload(
        running, load({"upstream": {"url": UPSTREAM}, "admin": {"token": TOKEN}}), guarded=True
    )
    assert (plan.result, plan.jobs, plan.routes_changed) == (
        "reloaded",
        ("recording (removed)",),
        True,
    )
    assert plan.effective.routes == ()


def test_routes_added_to_a_config_that_had_none_need_a_restart() -> None:
    data = config_dict()
    running = load({"upstream": data["upstream"], "admin": data["admin"]})
    plan = plan_reload(running, load(config_dict()), guarded=False)
    assert plan.result == "unchanged"
    assert plan.restart_required == ("routes",)
    assert plan.effective == running


# ---- the guard's swap, in-process --------------------------------------------------------------


@pytest.mark.anyio
async def test_in_flight_request_on_a_removed_job_finishes_and_new_requests_use_the_new_rules() -> (
    None
):
    now = [1000.0]
    async with in_process_guard(UPSTREAM, now) as guard:
        old = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert old is not None and old.job.limits.stuck_after == 1.0
        assert (
            await guard.review(GuardedPoll(old, 202, [], [], b"rid-1")) is not None
        )  # episode starts
        # A reload: stuck_after 5s, and the job renamed (the old one removed).
        new_data = guard_config(UPSTREAM, stuck_after="5s")
        new_data["jobs"] = {"renamed": new_data["jobs"]["recording"]}
        for route in new_data["routes"]:
            route["job"] = "renamed"
        guard.reconfigure(*guard_rules(load(new_data)))
        assert guard.rules.targets == {}  # no target outlives its rules
        # The request that found its target before the reload finishes on the old job, through
        # the store (record TTL carried by the job, not looked up by its now-removed name).
        answer = await guard.review_shared(GuardedPoll(old, 202, [], [], b"rid-2"))
        assert answer is not None and answer.status == 202
        now[0] += 2.0  # past the old stuck_after (1s), within the new one (5s)
        new = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert new is not None and new.job.name == "renamed"
        assert await guard.review(GuardedPoll(new, 202, [], [], b"rid-3")) is not None
        now[0] += 2.0
        assert (
            guard.review_at_once(GuardedPoll(new, 202, [], [], b"rid-4")) is not NEEDS_STORE
        )  # a PASS
        assert (
            guard.review_at_once(GuardedPoll(old, 202, [], [], b"rid-5")) is NEEDS_STORE
        )  # old: stuck
        guard.reconfigure(*guard_rules(load({"upstream": {"url": UPSTREAM}})))
        assert guard.target("GET", f"/api/recordings/file/{CALL}") is None


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("pollguard_config_reloads_total", {"result": result}) or 0.0


@asynccontextmanager
async def reloadable_app(path: Path, data: dict[str, Any]) -> AsyncIterator[PollguardApp]:
    await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
    app = PollguardApp(load(data), str(path))
    await app.startup()
    try:
        yield app
    finally:
        await app.shutdown()


def stuck_after(app: PollguardApp) -> float:
    assert app.guard is not None
    return app.guard.rules.jobs["recording"].limits.stuck_after


@pytest.mark.anyio
async def test_reload_applies_a_valid_file_and_keeps_the_config_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pollguard")
    path = tmp_path / "pollguard.yaml"
    async with reloadable_app(path, config_dict(stuck_after="30s")) as app:
        assert app.reloader is not None
        before = {result: reloads(result) for result in ("reloaded", "unchanged", "invalid")}
        path.write_text(yaml.safe_dump(config_dict(stuck_after="2s")))
        outcome = await app.reloader.reload()
        assert (outcome.result, outcome.restart_required) == ("reloaded", ())
        assert stuck_after(app) == 2.0
        assert (await app.reloader.reload()).result == "unchanged"

        bad = config_dict(stuck_after="soon")
        path.write_text(yaml.safe_dump(bad))
        outcome = await app.reloader.reload()
        assert outcome.result == "invalid" and outcome.error is not None
        assert "jobs.recording.stuck_after" in outcome.error
        assert "jobs.recording.stuck_after" in caplog.text
        hostile: list[Callable[[], object]] = [
            lambda: path.write_text("upstream: [unclosed\n"),
            lambda: path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1)),
            path.unlink,
            lambda: os.mkfifo(path),  # reading it would block forever
        ]
        for make in hostile:
            make()
            assert (await app.reloader.reload()).result == "invalid"
            assert stuck_after(app) == 2.0
        after = {result: reloads(result) for result in ("reloaded", "unchanged", "invalid")}
    assert after == {
        "reloaded": before["reloaded"] + 1,
        "unchanged": before["unchanged"] + 1,
        "invalid": before["invalid"] + 5,
    }
    assert "config reloaded from" in caplog.text


@pytest.mark.anyio
async def test_a_signal_storm_runs_one_reload_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "pollguard.yaml"
    async with reloadable_app(path, config_dict()) as app:
        running = 0
        most = 0
        reads = 0

        def read(source: str) -> Config:
            nonlocal running, most, reads
            running += 1
            reads += 1
            most = max(most, running)
            try:
                return load(yaml.safe_load(Path(source).read_text()))
            finally:
                running -= 1

        reloader = Reloader(str(path), app, read=read)
        for _ in range(50):
            reloader.on_signal()
        await asyncio.sleep(0)
        for _ in range(50):
            reloader.on_signal()
        task = reloader._signal_task
        assert task is not None
        await asyncio.wait_for(task, timeout=5)
    assert most == 1
    assert 1 <= reads <= 2


@pytest.mark.anyio
async def test_post_reload_needs_the_token(tmp_path: Path) -> None:
    path = tmp_path / "pollguard.yaml"
    async with reloadable_app(path, config_dict(stuck_after="30s")) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
            missing = await client.post("/-/reload")
            wrong = await client.post("/-/reload", headers={"authorization": "Bearer nope"})
            moved = config_dict(stuck_after="30s")
            moved["upstream"]["url"] = "http://127.0.0.1:10"
            path.write_text(yaml.safe_dump(moved))
            unchanged = await client.post("/-/reload", headers=AUTH)
            path.write_text(yaml.safe_dump(config_dict(stuck_after="3s")))
            reloaded = await client.post("/-/reload", headers=AUTH)
            path.write_text(yaml.safe_dump(config_dict(max_reprepares=-1)))
            invalid = await client.post("/-/reload", headers=AUTH)
        assert stuck_after(app) == 3.0
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["code"] == "unauthorized"
    assert unchanged.status_code == 200
    assert unchanged.json() == {"result": "unchanged", "restart_required": ["upstream.url"]}
    assert reloaded.json() == {"result": "reloaded", "restart_required": []}
    assert invalid.status_code == 422
    assert invalid.headers["content-type"] == "application/problem+json"
    assert invalid.json()["code"] == "invalid-config"
    assert "jobs.recording.max_reprepares" in invalid.json()["detail"]


@pytest.mark.anyio
async def test_post_reload_is_disabled_without_a_token(tmp_path: Path) -> None:
    data = config_dict()
    del data["admin"]
    async with reloadable_app(tmp_path / "pollguard.yaml", data) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
            response = await client.post("/-/reload", headers=AUTH)
    assert response.status_code == 403
    assert response.json()["code"] == "admin-disabled"


# ---- real pollguard serve processes ------------------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 connection, kept: every request goes over the same socket, and a closed one
    fails the test instead of reconnecting."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._buffer = b""

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: pollguard\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buffer:
            self._read()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        assert found is not None, head
        length = int(found.group(1))
        while len(self._buffer) < length:
            self._read()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(head.split(b" ", 2)[1]), body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "pollguard closed the kept-alive connection"
        self._buffer += chunk

    def close(self) -> None:
        self.sock.close()


def write_config(proxy: ProxyProcess, data: dict[str, Any]) -> None:
    proxy.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def count(proxy: ProxyProcess, text: str) -> int:
    return proxy.logs().count(text)


def test_sighup_applies_stuck_after_without_dropping_a_connection() -> None:
    """One worker: a kept-alive connection opened before SIGHUP keeps working, the new
    stuck_after decides its next polls, an invalid file is refused naming the field, and POST
    reload needs the token."""
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as upstream:
        data = guard_config(upstream.url, stuck_after="30s", max_wait="60s")
        data["admin"] = {"token": TOKEN}
        with running_proxy(data) as proxy:
            assert proxy.process is not None
            connection = KeepAlive(proxy.port)
            try:
                assert connection.get(f"/api/recordings/file/{CALL}")[0] == 202  # episode starts
                with httpx.Client(base_url=proxy.url, timeout=5) as client:
                    assert client.post("/-/reload").status_code == 401
                write_config(
                    proxy,
                    guard_config(upstream.url, stuck_after="1s", max_wait="60s")
                    | {"admin": {"token": TOKEN}},
                )
                proxy.process.send_signal(signal.SIGHUP)
                wait_until(lambda: count(proxy, "config reloaded from") == 1, 5, "the reload")
                assert "recording (changed)" in proxy.logs()
                # Same socket: polls until stuck_after (now 1s) has passed and a re-prepare fixed it.
                polls: list[tuple[int, bytes]] = []
                wait_until(
                    lambda: (
                        polls.append(connection.get(f"/api/recordings/file/{CALL}"))
                        or b"reprepared" in polls[-1][1]
                    ),
                    5,
                    "a re-prepare decided by the new stuck_after",
                )
                assert jobs.prepares[CALL] == 1
                assert connection.get(f"/api/recordings/file/{CALL}")[0] == 200

                invalid = guard_config(upstream.url, stuck_after="soon") | {
                    "admin": {"token": TOKEN}
                }
                write_config(proxy, invalid)
                proxy.process.send_signal(signal.SIGHUP)
                wait_until(lambda: count(proxy, "config reload failed") == 1, 5, "the refusal")
                assert "jobs.recording.stuck_after" in proxy.logs()
                other = "CA" + "1" * 32
                assert connection.get(f"/api/recordings/file/{other}")[0] == 202
                with httpx.Client(base_url=proxy.url, timeout=5, headers=AUTH) as client:
                    refused = client.post("/-/reload")
                    assert refused.status_code == 422
                    assert "jobs.recording.stuck_after" in refused.json()["detail"]
                    moved = guard_config(upstream.url, stuck_after="1s", max_wait="60s")
                    moved["upstream"]["read_timeout"] = "9s"
                    write_config(proxy, moved | {"admin": {"token": TOKEN}})
                    response = client.post("/-/reload")
                assert response.json() == {
                    "result": "unchanged",
                    "restart_required": ["upstream.read_timeout"],
                }
                assert "upstream.read_timeout changed but needs a restart" in proxy.logs()
                assert connection.get(f"/api/recordings/file/{other}")[0] == 202
            finally:
                connection.close()


def reloaded_pids(proxy: ProxyProcess) -> set[str]:
    return set(re.findall(r"config reloaded from \S+ by process (\d+)", proxy.logs()))


def test_sighup_to_the_supervisor_reloads_every_worker(redis_server: RedisServer) -> None:
    """--workers 2: SIGHUP to the supervisor reaches both workers (each logs its reload), a
    kept-alive connection survives it, and POST reload on one worker reloads the other too."""
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as upstream:
        data = guard_config(
            upstream.url, redis_url=redis_server.url, stuck_after="30s", max_wait="60s"
        )
        data["admin"] = {"token": TOKEN}
        data["server"] = {"workers": 2}
        with running_proxy(data) as proxy:
            assert proxy.process is not None
            connection = KeepAlive(proxy.port)
            try:
                assert connection.get(f"/api/recordings/file/{CALL}")[0] == 202
                data["jobs"]["recording"]["stuck_after"] = "20s"
                write_config(proxy, data)
                proxy.process.send_signal(signal.SIGHUP)
                wait_until(lambda: len(reloaded_pids(proxy)) == 2, 10, "both workers reloading")
                assert "Received SIGHUP, asking 2 worker(s)" in proxy.logs()
                assert "restarting processes" not in proxy.logs()
                assert connection.get(f"/api/recordings/file/{CALL}")[0] == 202
                lines = count(proxy, "config reloaded from")
                data["jobs"]["recording"]["stuck_after"] = "10s"
                write_config(proxy, data)
                with httpx.Client(base_url=proxy.url, timeout=5, headers=AUTH) as client:
                    assert client.post("/-/reload").json()["result"] == "reloaded"
                # This worker, then the other one through the supervisor (this one's echo,
                # finding nothing changed, is not logged again).
                wait_until(
                    lambda: count(proxy, "config reloaded from") == lines + 2,
                    10,
                    "the other worker reloading after POST reload",
                )
                last = [
                    line for line in proxy.logs().splitlines() if "config reloaded from" in line
                ][-2:]
                assert all("jobs recording (changed)" in line for line in last)
                assert len({re.findall(r"by process (\d+)", line)[0] for line in last}) == 2
                assert connection.get(f"/api/recordings/file/{CALL}")[0] == 202
            finally:
                connection.close()


@pytest.mark.anyio
async def test_post_reload_takes_any_named_admin_token(tmp_path: Path) -> None:
    """admin.tokens: each named token may reload (the same rule as the other admin writes)."""
    path = tmp_path / "pollguard.yaml"
    data = config_dict(stuck_after="30s")
    data["admin"] = {"tokens": {"ops": "ops-t0ken", "ci": "ci-t0ken"}}
    async with reloadable_app(path, data) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
            old = await client.post("/-/reload", headers=AUTH)
            ci = await client.post("/-/reload", headers={"authorization": "Bearer ci-t0ken"})
    assert old.status_code == 401
    assert ci.status_code == 200
