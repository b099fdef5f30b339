"""The job admin API end to end: a real pollguard process in front of a real job backend, driven
into pending, stuck and terminal episodes by polling, then listed, shown, reset and re-prepared
over HTTP and through `pollguard jobs`; tokens, validation, audit (API and log) and the gauge."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import proxy
from proxy.cli import main
from proxy.jobs_cli import TOKEN_ENV
from tests.conftest import RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ProxyProcess, ThreadedServer, raw_request, running_proxy

OPS_TOKEN = "ops-secret-token"
CI_TOKEN = "ci-secret-token"
STUCK = "CAstuck1"
TERMINAL = "CAterminal1"
FILE = "/api/recordings/file/"


def admin_config(upstream_url: str, redis_url: str | None = None) -> dict[str, Any]:
    config = guard_config(
        upstream_url,
        redis_url=redis_url,
        key_pattern="^CA[0-9A-Za-z]+$",
        max_wait="1m",
    )
    config["jobs"]["recording"]["reprepare"]["forward_headers"] = ["authorization"]  # type: ignore[index]
    config["admin"] = {
        "tokens": {"ops": "${OPS_TOKEN:-}", "ci": CI_TOKEN, "disabled": "${UNSET_TOKEN:-}"}
    }
    config["logging"] = {"format": "json"}
    return config


@pytest.fixture
def backend() -> Iterator[tuple[JobBackend, ThreadedServer]]:
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as server:
        yield jobs, server


def api(proxy_: ProxyProcess, token: str | None = OPS_TOKEN) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=proxy_.url + "/-/", headers=headers, timeout=10)


def episode_state(client: httpx.Client, key: str) -> str | None:
    response = client.get(f"jobs/recording/{key}")
    return response.json()["episode"]["state"] if response.status_code == 200 else None


def cli(
    proxy_: ProxyProcess, *args: str, token: str | None = OPS_TOKEN
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(proxy.__file__).parent.parent)}
    if token is not None:
        env[TOKEN_ENV] = token
    return subprocess.run(
        [sys.executable, "-m", "proxy", "jobs", *args[:1], "--url", proxy_.url, *args[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_admin_api_lists_shows_resets_and_reprepares(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    jobs, server = backend
    jobs.behaviour[TERMINAL] = "never"
    config = admin_config(server.url)
    with (
        running_proxy(config, extra_env={"OPS_TOKEN": OPS_TOKEN}) as proxy_,
        api(proxy_) as client,
        httpx.Client(base_url=proxy_.url, timeout=10) as poller,
    ):
        # A pending episode for STUCK, left alone until it is stuck.
        assert poller.get(FILE + STUCK).status_code == 202
        assert client.get(f"jobs/recording/{STUCK}").json()["episode"]["state"] == "pending"
        # TERMINAL polled until pollguard ends its loop (2 re-prepares, then job-stuck).
        wait_until(
            lambda: poller.get(FILE + TERMINAL).status_code == 500, 15, "TERMINAL to end in 500"
        )
        wait_until(lambda: episode_state(client, STUCK) == "stuck", 10, "STUCK to be stuck")

        listing = client.get("jobs/recording").json()
        by_key = {e["key"]: e for e in listing["episodes"]}
        assert set(by_key) == {STUCK, TERMINAL} and listing["cursor"] is None
        assert by_key[STUCK]["decision"] == "reprepare" and by_key[STUCK]["attempts"] == 0
        assert by_key[TERMINAL]["state"] == "terminal"
        assert by_key[TERMINAL]["decision"] == "job-stuck"
        assert by_key[TERMINAL]["attempts"] == 2 and by_key[TERMINAL]["window"] is not None
        assert by_key[TERMINAL]["last_poll"].endswith("Z")
        terminal_only = client.get("jobs/recording", params={"state": "terminal"}).json()
        assert [e["key"] for e in terminal_only["episodes"]] == [TERMINAL]
        page = client.get("jobs/recording", params={"limit": 1}).json()
        assert len(page["episodes"]) == 1 and page["cursor"] is not None
        rest = client.get("jobs/recording", params={"limit": 1, "cursor": page["cursor"]}).json()
        assert {page["episodes"][0]["key"], rest["episodes"][0]["key"]} == {STUCK, TERMINAL}

        # Re-prepare STUCK now, forwarding the caller's Authorization (and nothing else).
        forced = client.post(
            f"jobs/recording/{STUCK}/reprepare",
            headers={"x-audit-reason": "ticket OPS-1"},
            json={"headers": {"Authorization": "Bearer user-token", "x-other": "1"}},
        )
        assert forced.status_code == 200, forced.text
        body = forced.json()
        assert body["outcome"] == "succeeded" and body["attempt"] == 1
        assert body["forwarded_headers"] == ["authorization"]
        assert body["ignored_headers"] == ["x-other"]
        assert body["episode"]["state"] == "pending" and body["episode"]["lock"] is None
        assert jobs.prepares[STUCK] == 1
        assert jobs.prepare_headers[-1]["authorization"] == "Bearer user-token"
        assert "x-other" not in jobs.prepare_headers[-1]

        # TERMINAL's budget is spent: 409, telling to reset first.
        exhausted = client.post(
            f"jobs/recording/{TERMINAL}/reprepare", headers={"x-audit-reason": "retry"}
        )
        assert exhausted.status_code == 409
        assert exhausted.json()["code"] == "reprepare-budget-exhausted"
        assert "DELETE" in exhausted.json()["detail"]
        assert jobs.prepares[TERMINAL] == 2

        # Reset TERMINAL: forgotten; its next poll starts a fresh (pending) episode.
        reset = client.delete(
            f"jobs/recording/{TERMINAL}", headers={"x-audit-reason": "backend fixed"}
        )
        assert reset.status_code == 200
        assert reset.json()["before"]["state"] == "terminal" and reset.json()["audited"] is True
        assert client.get(f"jobs/recording/{TERMINAL}").json()["code"] == "no-episode"
        assert poller.get(FILE + TERMINAL).status_code == 202
        assert episode_state(client, TERMINAL) == "pending"

        audit = client.get("audit").json()["entries"]
        assert [(e["action"], e["key"]) for e in audit] == [
            ("reset", TERMINAL),
            ("reprepare", STUCK),
        ]
        assert audit[0]["actor"] == "ops" and audit[0]["reason"] == "backend fixed"
        assert audit[0]["client_ip"] == "127.0.0.1"
        assert audit[0]["before"]["state"] == "terminal" and audit[0]["after"] is None
        assert audit[1]["before"]["state"] == "stuck" and audit[1]["outcome"] == "succeeded"
        assert audit[1]["after"]["attempts"] == 1
        assert client.get("audit", params={"limit": 1}).json()["entries"] == audit[:1]

        metrics = client.get("metrics").text
        assert 'pollguard_jobs{job="recording",state="pending"} 2.0' in metrics
        assert 'pollguard_jobs{job="recording",state="stuck"} 0.0' in metrics
        logs = proxy_.logs()
    lines = [json.loads(line) for line in logs.splitlines() if '"pollguard.audit"' in line]
    assert [line["audit_action"] for line in lines] == ["reprepare", "reset"]
    assert lines[1]["audit_actor"] == "ops" and lines[1]["audit_reason"] == "backend fixed"
    assert lines[1]["audit_before"]["state"] == "terminal"
    assert OPS_TOKEN not in logs


def test_admin_api_refuses_what_it_must(backend: tuple[JobBackend, ThreadedServer]) -> None:
    _, server = backend
    with running_proxy(admin_config(server.url)) as proxy_, api(proxy_, CI_TOKEN) as client:
        assert httpx.get(proxy_.url + FILE + STUCK).status_code == 202
        # Tokens: none, wrong, and OPS_TOKEN whose variable is unset (that token is disabled).
        for token in (None, "wrong", OPS_TOKEN):
            with api(proxy_, token) as other:
                answer = other.get("jobs/recording")
                assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"
                assert other.get("metrics").status_code == 401
        assert client.get("metrics").status_code == 200
        unknown = client.get("jobs/nosuchjob")
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown-job"
        missing = client.get("jobs/recording/CAnothere")
        assert missing.status_code == 404 and missing.json()["code"] == "no-episode"
        for bad_key in ("x" * 300, "nope", "CA%2F..%2Fx", "%2E%2E", "CA%00x", "%FF"):
            answer = client.get(f"jobs/recording/{bad_key}")
            assert answer.status_code == 400, bad_key
            assert answer.json()["code"] == "bad-request"
        # Writes need a reason: present, short, without control characters.
        for headers in ({}, {"x-audit-reason": "x" * 501}):
            answer = client.delete(f"jobs/recording/{STUCK}", headers=headers)
            assert answer.status_code == 400 and answer.json()["code"] == "audit-reason-required"
        control = raw_request(  # a C1 control character (U+0085, sent as UTF-8)
            proxy_.port,
            f"DELETE /-/jobs/recording/{STUCK} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {CI_TOKEN}\r\nX-Audit-Reason: a\u0085b\r\n\r\n".encode(),
        )
        assert control.startswith(b"HTTP/1.1 400") and b"audit-reason-required" in control
        assert client.get(f"jobs/recording/{STUCK}").status_code == 200  # not reset
        reason = {"x-audit-reason": "test"}
        for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"state": "odd"}):
            assert client.get("jobs/recording", params=params).status_code == 400
        assert client.get("jobs/recording", params={"cursor": "nope"}).status_code == 400
        too_big = client.post(
            f"jobs/recording/{STUCK}/reprepare", headers=reason, content=b"{" + b" " * 17000
        )
        assert too_big.status_code == 413
        for body in (b"[1]", b"not json", b'{"headers": {"a": 1}}', b'{"other": {}}'):
            answer = client.post(f"jobs/recording/{STUCK}/reprepare", headers=reason, content=body)
            assert answer.status_code == 400, body
        assert client.get("audit").json()["entries"] == []


def test_without_tokens_the_job_api_is_off(backend: tuple[JobBackend, ThreadedServer]) -> None:
    _, server = backend
    config = admin_config(server.url)
    del config["admin"]
    with running_proxy(config) as proxy_, api(proxy_, None) as client:
        for path in ("jobs/recording", f"jobs/recording/{STUCK}", "audit"):
            answer = client.get(path)
            assert answer.status_code == 403 and answer.json()["code"] == "admin-disabled"
        assert client.get("metrics").status_code == 200


def test_jobs_cli_over_the_api(backend: tuple[JobBackend, ThreadedServer]) -> None:
    jobs, server = backend
    with running_proxy(admin_config(server.url), extra_env={"OPS_TOKEN": OPS_TOKEN}) as proxy_:
        assert httpx.get(proxy_.url + FILE + STUCK).status_code == 202
        table = cli(proxy_, "list", "recording")
        assert table.returncode == 0, table.stderr
        header, row, total = table.stdout.splitlines()
        assert header.split()[:3] == ["KEY", "STATE", "PENDING_S"]
        assert row.split()[:2] == [STUCK, "pending"] and total == "1 episode(s)"
        shown = cli(proxy_, "show", "recording", STUCK, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["episode"]["key"] == STUCK
        assert cli(proxy_, "show", "recording", STUCK).stdout.startswith(f"key:            {STUCK}")
        forced = cli(proxy_, "reprepare", "recording", STUCK, "--reason", "CLI test",
                     "--header", "Authorization: Bearer cli")  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.startswith("re-prepare succeeded")
        assert jobs.prepare_headers[-1]["authorization"] == "Bearer cli"
        reset = cli(proxy_, "reset", "recording", STUCK, "--reason", "done")
        assert reset.returncode == 0 and reset.stdout.startswith(f"reset recording/{STUCK}")
        again = cli(proxy_, "reset", "recording", STUCK, "--reason", "done")
        assert again.returncode == 1 and "404 no-episode" in again.stderr
        audit = cli(proxy_, "audit", "--json")
        entries = json.loads(audit.stdout)["entries"]
        assert [(e["action"], e["actor"]) for e in entries] == [
            ("reset", "ops"),
            ("reprepare", "ops"),
        ]
        assert "CLI test" in cli(proxy_, "audit").stdout
        unauthorized = cli(proxy_, "list", "recording", token="wrong")
        assert unauthorized.returncode == 1 and "401 unauthorized" in unauthorized.stderr
        no_reason = cli(proxy_, "reset", "recording", STUCK)
        assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    refused = cli(proxy_, "list", "recording")  # the proxy is gone now
    assert refused.returncode == 2 and "connection error" in refused.stderr


def test_jobs_gauge_is_computed_once_for_replicas_sharing_redis(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    _, server = backend
    config = admin_config(server.url, redis_server.url)
    env = {"OPS_TOKEN": OPS_TOKEN}
    with (
        running_proxy(config, extra_env=env) as first,
        running_proxy(config, extra_env=env) as second,
        api(first) as one,
        api(second) as two,
    ):
        for key in ("CAa", "CAb", "CAc"):
            assert httpx.get(second.url + FILE + key).status_code == 202
        listing = one.get("jobs/recording").json()
        assert sorted(e["key"] for e in listing["episodes"]) == ["CAa", "CAb", "CAc"]
        assert one.get("metrics").status_code == 200  # first scans and writes the counts
        assert httpx.get(second.url + FILE + "CAd").status_code == 202
        # second reads what first counted (the lease is first's for 15s): still 3.
        assert 'pollguard_jobs{job="recording",state="pending"} 3.0' in two.get("metrics").text
        reset = two.delete("jobs/recording/CAa", headers={"x-audit-reason": "shared"})
        assert reset.status_code == 200
        assert one.get("audit").json()["entries"][0]["key"] == "CAa"
        assert one.get("jobs/recording/CAd").json()["episode"]["last_poll"] is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "rec", "--url", "ftp://x"], "--url must be http"),
        (["list", "rec", "--url", "http://x", "--limit", "0"], "--limit must be 1..1000"),
        (
            ["reprepare", "rec", "K", "--url", "http://x", "--reason", "r", "--header", "x"],
            "NAME:VALUE",
        ),
        (["reset", "rec", "K", "--url", "http://x"], "needs --reason"),
    ],
)
def test_jobs_cli_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["jobs", *argv]) == 2
    assert message in capsys.readouterr().err
