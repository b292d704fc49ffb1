"""The Qonto boundary, faked at the HTTP level with httpx.MockTransport (Cegid: test_cegid.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import Callable

import httpx
import pytest

from relay import config, errors
from relay.domain import credentials
from relay.upstreams import qonto
from tests.unit import clients

Handler = Callable[[httpx.Request], httpx.Response]


async def no_wait(_: float) -> None:
    await asyncio.sleep(0)


def _qonto(
    settings: config.Settings,
    handler: Handler,
    creds: credentials.QontoCredentials | None = None,
    rotated: list[credentials.QontoCredentials] | None = None,
) -> qonto.QontoClient:
    return clients.qonto_client(
        settings,
        handler,
        creds=creds or credentials.QontoApiKey(login="org", secret=config.Secret("key")),
        rotated=rotated,
        sleep=no_wait,
    )


async def test_api_key_is_sent_verbatim_and_html_is_refused(unit_settings: config.Settings) -> None:
    """`login:secret` with no scheme; a login page answered 200 is a protocol error, not data."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})

    with pytest.raises(errors.QontoProtocolError, match="not JSON"):
        await _qonto(unit_settings, handler).get_membership()
    assert seen == ["org:key"]


async def test_429_and_5xx_are_retried_then_reported(unit_settings: config.Settings) -> None:
    """Retries honour Retry-After; after the last try the error says rate limited."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(429, headers={"retry-after": "0"})

    with pytest.raises(errors.QontoRateLimited):
        await _qonto(unit_settings, handler).get_organization()
    assert len(calls) == qonto.POLICY.attempts


async def test_deleted_attachment_is_not_found(unit_settings: config.Settings) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"errors": [{"code": "not_found"}]})

    with pytest.raises(errors.QontoNotFound):
        await _qonto(unit_settings, handler).get_attachment("gone")


async def test_download_refetches_an_expired_url_and_never_sends_the_key(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """403 from storage: a fresh URL once; storage requests carry no Authorization header."""
    urls = iter(["https://storage.test/old", "https://storage.test/new"])
    storage_auth = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.test":
            storage_auth.append("authorization" in request.headers)
            if request.url.path == "/old":
                return httpx.Response(403, text="expired")
            return httpx.Response(200, content=b"%PDF-1.7 body")
        return httpx.Response(
            200, json={"attachment": {"id": "a", "url": next(urls), "file_size": "13"}}
        )

    done = await _qonto(unit_settings, handler).download("a", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b"%PDF-1.7 body"
    assert done.head.startswith(b"%PDF")
    assert storage_auth == [False, False]


async def test_oauth_refreshes_before_expiry_and_hands_over_the_rotated_token() -> None:
    """An access token close to expiry is refreshed first; the new refresh token is stored."""
    settings = config.Settings(
        secret_key=config.Secret("x" * 43 + "="),
        qonto_client_id="app",
        qonto_client_secret=config.Secret("app-secret"),
        qonto_oauth_url="https://oauth.test",
    )
    rotated: list[credentials.QontoCredentials] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "oauth.test":
            assert b"grant_type=refresh_token" in request.content
            return httpx.Response(
                200,
                json={
                    "access_token": "new-access",
                    "refresh_token": "new-refresh",
                    "expires_in": 3600,
                },
            )
        assert request.headers["authorization"] == "Bearer new-access"
        return httpx.Response(200, json={"membership": {"role": "owner"}})

    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    creds = credentials.QontoOAuth(
        refresh_token=config.Secret("old-refresh"),
        access_token=config.Secret("old-access"),
        expires_at=soon,
    )
    assert (await _qonto(settings, handler, creds, rotated).get_membership())["role"] == "owner"
    assert isinstance(rotated[0], credentials.QontoOAuth)
    assert rotated[0].refresh_token.reveal() == "new-refresh"
