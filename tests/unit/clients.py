"""The one builder of Qonto clients for unit tests: the product's client over an httpx MockTransport."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import httpx

from relay import config
from relay.domain import credentials
from relay.upstreams import qonto

Handler = Callable[[httpx.Request], httpx.Response]
API_KEY = credentials.QontoApiKey(login="org-login", secret=config.Secret("org-secret-key"))


def qonto_client(
    settings: config.Settings,
    handler: Handler,
    *,
    creds: credentials.QontoCredentials = API_KEY,
    limiter: qonto.RateLimiter | None = None,
    on_tokens_rotated: qonto.TokensRotated | None = None,
    rotated: list[credentials.QontoCredentials] | None = None,
    sleep: qonto.Sleep = asyncio.sleep,
    now: Callable[[], dt.datetime] | None = None,
) -> qonto.QontoClient:
    """Build a client for ``creds`` whose every request (API at https://qonto.test, storage URLs
    as given) is answered by ``handler``; rotated OAuth tokens go to ``on_tokens_rotated``, or are
    appended to ``rotated``."""
    transport = httpx.MockTransport(handler)
    http = qonto.HttpClients(
        api=httpx.AsyncClient(transport=transport, base_url="https://qonto.test"),
        storage=httpx.AsyncClient(transport=transport),
        limiter=limiter or qonto.RateLimiter(),
    )

    async def keep(new: credentials.QontoCredentials) -> None:
        if rotated is not None:
            rotated.append(new)

    if now is None:
        return qonto.client(
            settings, creds, http, on_tokens_rotated=on_tokens_rotated or keep, sleep=sleep
        )
    return qonto.client(
        settings, creds, http, on_tokens_rotated=on_tokens_rotated or keep, sleep=sleep, now=now
    )
