"""The forced re-prepare request's error paths (respx stands in for the upstream here only)."""

from __future__ import annotations

import httpx
import pytest
import respx

from proxy.reprepare import Repreparer, ReprepareRequest, idempotency_key

BASE = "http://backend.test"
SPEC = ReprepareRequest(
    method="POST",
    path="/api/recordings/{call_sid}/prepare",
    query={"force": "1"},
    headers={"x-fixed": "yes"},
    forward_headers=("authorization", "cookie"),
    timeout=0.5,
)
CLIENT_HEADERS = [
    (b"authorization", b"Bearer alice"),
    (b"cookie", b"session=a"),
    (b"x-other", b"no"),
]


async def fire(repreparer: Repreparer, sid: str = "CA1") -> object:
    return await repreparer.fire(
        SPEC,
        params={"call_sid": sid},
        client_headers=CLIENT_HEADERS,
        idempotency="idem-1",
        request_id="rid-1",
    )


@pytest.mark.anyio
async def test_success_sends_the_configured_request() -> None:
    """2xx succeeds; method, path, query, fixed and forwarded headers, Idempotency-Key and X-Request-ID are sent."""
    async with respx.mock(base_url=BASE) as mock:
        route = mock.post("/api/recordings/CA1/prepare", params={"force": "1"}).respond(202)
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer)
        await repreparer.close()
    assert result.succeeded  # type: ignore[attr-defined]
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Bearer alice"
    assert sent.headers["cookie"] == "session=a"
    assert sent.headers["x-fixed"] == "yes"
    assert sent.headers["idempotency-key"] == "idem-1"
    assert sent.headers["x-request-id"] == "rid-1"
    assert "x-other" not in sent.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("side_effect", "expected"),
    [
        (httpx.Response(500), "upstream answered 500"),
        (httpx.Response(404), "upstream answered 404"),
        (httpx.ConnectError("refused"), "ConnectError"),
        (httpx.ReadTimeout("slow"), "timed out after 0.5s"),
        (httpx.ConnectTimeout("slow"), "timed out"),
        (httpx.RemoteProtocolError("reset"), "RemoteProtocolError"),
    ],
)
async def test_failures_are_reported_not_raised(side_effect: object, expected: str) -> None:
    """Non-2xx, timeouts and connection errors become a failed result whose detail names the cause."""
    async with respx.mock(base_url=BASE) as mock:
        mock.post("/api/recordings/CA1/prepare").mock(side_effect=[side_effect])
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer)
        await repreparer.close()
    assert not result.succeeded  # type: ignore[attr-defined]
    assert expected in result.detail  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_cookies_from_one_reprepare_never_reach_the_next() -> None:
    """The re-prepare client keeps no cookie jar: a Set-Cookie is not replayed."""
    async with respx.mock(base_url=BASE) as mock:
        route = mock.post(url__regex=r"/api/recordings/.*/prepare").respond(
            200, headers={"set-cookie": "stolen=1; Path=/"}
        )
        repreparer = Repreparer(BASE, connect_timeout=1)
        await repreparer.fire(
            SPEC, params={"call_sid": "CA1"}, client_headers=[], idempotency="i", request_id="r"
        )
        await repreparer.fire(
            SPEC, params={"call_sid": "CA2"}, client_headers=[], idempotency="i", request_id="r"
        )
        await repreparer.close()
    assert "cookie" not in route.calls.last.request.headers


def test_path_parameters_are_percent_encoded() -> None:
    """A parameter with a slash cannot change which path is re-prepared."""
    from proxy.routes import fill_path_template

    assert fill_path_template(SPEC.path, {"call_sid": "a/b"}) == "/api/recordings/a%2Fb/prepare"


def test_idempotency_key_is_unique_per_attempt() -> None:
    """Same (job, key, episode, window, attempt) → same key; any change → another key."""
    base = idempotency_key("recording", "CA1", 1.0, 2.0, 1)
    assert base == idempotency_key("recording", "CA1", 1.0, 2.0, 1)
    others = {
        idempotency_key("recording", "CA1", 1.0, 2.0, 2),
        idempotency_key("recording", "CA2", 1.0, 2.0, 1),
        idempotency_key("other", "CA1", 1.0, 2.0, 1),
        idempotency_key("recording", "CA1", 1.5, 2.0, 1),
        idempotency_key("recording", "CA1", 1.0, 3.0, 1),
    }
    assert base not in others and len(others) == 5
