"""Qonto's Business API client, where httpx and Qonto errors become the relay's.

Calls are tried again under :data:`POLICY` and kept under Qonto's documented rate limit by a
:class:`RateLimiter`; OAuth tokens are refreshed before expiry. The list walks are
:mod:`relay.upstreams.listing`'s, the file downloads :mod:`relay.upstreams.attachments`'. URLs are
never logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import orjson

from relay import config, errors, events, log, retry
from relay.domain import credentials
from relay.upstreams import attachments, listing

logger = log.get(__name__)

# every call (429, 5xx, network errors) and every attachment download: six tries, full jitter
POLICY: Final = retry.Policy(first_s=0.5, cap_s=30.0, attempts=6)
# a rotated refresh token handed to the store (the database): four tries before it is left unsaved
STORE_POLICY: Final = dataclasses.replace(POLICY, attempts=4)
ONE_TRY: Final = dataclasses.replace(POLICY, attempts=1)  # the next call's store, one try
STORE_RETRY_GAP: Final = dt.timedelta(seconds=5)  # between later tries of an unsaved rotation
LIMIT_WINDOW_S: Final = 10.0
REFRESH_MARGIN: Final = dt.timedelta(minutes=5)

Sleep = Callable[[float], Awaitable[None]]
TokensRotated = Callable[[credentials.QontoCredentials], Awaitable[None]]

# What the relay asks the member to consent to (contracts/qonto.md): webhooks, transactions and
# memberships, attachments, supplier and client invoices, the plan, and a refresh token.
SCOPES: Final = (
    "webhook",
    "organization.read",
    "attachment.read",
    "supplier_invoice.read",
    "client_invoices.read",
    "subscription.read",
    "offline_access",
)
CALLBACK_PATH: Final = "/setup/oauth/callback"


def redirect_uri(settings: config.Settings) -> str:
    """Return where Qonto sends the browser after the consent (registered with the OAuth app)."""
    return settings.public_url.rstrip("/") + CALLBACK_PATH


def authorization_url(settings: config.Settings, state: str) -> str:
    """Build the URL of the consent page for the relay's OAuth app, ``state`` naming one setup."""
    if not settings.qonto_client_id:
        raise errors.ConfigurationError(
            "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: required for the Qonto consent"
        )
    query = urlencode(
        {
            "client_id": settings.qonto_client_id,
            "redirect_uri": redirect_uri(settings),
            "response_type": "code",
            "scope": " ".join(SCOPES),
            "state": state,
        }
    )
    return f"{settings.qonto_oauth_url.rstrip('/')}/oauth2/auth?{query}"


class RateLimiter:
    """At most ``limit`` requests per sliding ``window`` seconds, shared by one HttpClients bundle.

    Qonto allows 1,000 requests per 10 s per IP; the default keeps headroom. ``clock`` and ``sleep``
    are injectable so tests need not wait.
    """

    def __init__(
        self,
        limit: int = 900,
        window: float = LIMIT_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs limit >= 1 and window > 0")
        self._limit, self._window = limit, window
        self._clock, self._sleep = clock, sleep
        self._sent: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more request fits in the window, then count it."""
        async with self._lock:
            while True:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self._window:
                    self._sent.popleft()
                if len(self._sent) < self._limit:
                    self._sent.append(now)
                    return
                await self._sleep(self._window - (now - self._sent[0]))


@dataclasses.dataclass
class HttpClients:
    """The process's Qonto HTTP bundle, ``api`` (base URL, staging token) and ``storage`` (bare)."""

    api: httpx.AsyncClient
    storage: httpx.AsyncClient
    limiter: RateLimiter


@contextlib.asynccontextmanager
async def http_clients(settings: config.Settings) -> AsyncIterator[HttpClients]:
    """Open the API and storage clients with explicit timeouts, closing them on exit."""
    headers = {"Accept": "application/json", "User-Agent": "qonto-cegid-relay"}
    if settings.qonto_staging_token is not None:
        headers["X-Qonto-Staging-Token"] = settings.qonto_staging_token.reveal()
    # httpcore scans its whole pool on every request: size it to the work in flight
    size = min(64, 2 * settings.upload_concurrency + 4)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    async with (
        httpx.AsyncClient(
            base_url=settings.qonto_api_url,
            headers=headers,
            timeout=httpx.Timeout(connect=5, read=30, write=30, pool=10),
            transport=httpx.AsyncHTTPTransport(limits=limits, retries=0),  # POLICY retries
        ) as api,
        httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5, read=60, write=30, pool=10),
            transport=httpx.AsyncHTTPTransport(limits=limits, retries=0),  # POLICY retries
            headers={"User-Agent": "qonto-cegid-relay"},
        ) as storage,
    ):
        yield HttpClients(
            api=api,
            storage=storage,
            limiter=RateLimiter(settings.qonto_requests_per_10s, LIMIT_WINDOW_S),
        )


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        first = body["errors"][0]
        return str(first.get("detail") or first.get("code"))[:200]
    except Exception:
        return f"HTTP {response.status_code}"


class QontoClient:
    def __init__(
        self,
        settings: config.Settings,
        creds: credentials.QontoCredentials,
        http: HttpClients,
        *,
        on_tokens_rotated: TokensRotated | None = None,
        sleep: Sleep = asyncio.sleep,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._settings = settings
        self._creds = creds
        self._http = http
        self._on_rotated = on_tokens_rotated
        self._sleep = sleep
        self._now = now
        self._refresh_lock = asyncio.Lock()
        self._store_lock = asyncio.Lock()
        self._unsaved: credentials.QontoOAuth | None = None  # rotated, not yet stored
        self._store_retry_at = dt.datetime.min.replace(tzinfo=dt.UTC)

    # ------------------------------------------------------------------------------ auth

    async def _authorization(self) -> str:
        creds = self._creds
        if isinstance(creds, credentials.QontoApiKey):
            return creds.header()
        if (
            creds.access_token is None
            or creds.expires_at is None
            or (creds.expires_at - self._now() < REFRESH_MARGIN)
        ):
            await self._refresh(creds)
        assert isinstance(self._creds, credentials.QontoOAuth)
        assert self._creds.access_token is not None
        return f"Bearer {self._creds.access_token.reveal()}"

    async def _refresh(self, stale: credentials.QontoOAuth) -> None:
        async with self._refresh_lock:
            if self._creds is not stale:
                return  # another task refreshed meanwhile
            if not self._settings.qonto_client_id or self._settings.qonto_client_secret is None:
                raise errors.ConfigurationError(
                    "OAuth connection but RELAY_QONTO_CLIENT_ID/RELAY_QONTO_CLIENT_SECRET are not set"
                )
            form = {
                "grant_type": "refresh_token",
                "refresh_token": stale.refresh_token.reveal(),
                "client_id": self._settings.qonto_client_id,
                "client_secret": self._settings.qonto_client_secret.reveal(),
            }
            url = self._settings.qonto_oauth_url.rstrip("/") + "/oauth2/token"
            response = await self._send(lambda: self._http.api.post(url, data=form), "oauth token")
            if response.status_code in (400, 401, 403):
                raise errors.QontoAuthRejected(
                    "Qonto refused the OAuth refresh token: the organization must reconnect"
                )
            fresh = self._tokens(self._json(response, "oauth token"))
            self._creds = fresh
            logger.info("qonto_token_refreshed")
            if self._on_rotated is not None:
                # the old refresh token dies 60 s from now: this one must reach the store
                self._unsaved = fresh
                await self._store_rotated(STORE_POLICY)

    def _tokens(self, payload: dict[str, Any]) -> credentials.QontoOAuth:
        """Read the credentials of a token endpoint's answer."""
        try:
            return credentials.QontoOAuth(
                refresh_token=config.Secret(str(payload["refresh_token"])),
                access_token=config.Secret(str(payload["access_token"])),
                expires_at=self._now() + dt.timedelta(seconds=int(payload.get("expires_in", 3600))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.QontoProtocolError(
                "Qonto oauth token: answer without access_token/refresh_token/expires_in"
            ) from exc

    async def _exchange(self, code: str) -> None:
        """Trade the consent's authorization code for tokens, which this client then uses."""
        if not self._settings.qonto_client_id or self._settings.qonto_client_secret is None:
            raise errors.ConfigurationError(
                "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: required for the Qonto consent"
            )
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": self._settings.qonto_client_id,
            "client_secret": self._settings.qonto_client_secret.reveal(),
            "redirect_uri": redirect_uri(self._settings),
        }
        url = self._settings.qonto_oauth_url.rstrip("/") + "/oauth2/token"
        response = await self._send(lambda: self._http.api.post(url, data=form), "oauth code")
        if response.status_code in (400, 401, 403):
            raise errors.QontoAuthRejected(
                "Qonto refused the authorization code (expired, already used, or for another app)"
            )
        self._creds = self._tokens(self._json(response, "oauth code"))
        logger.info("qonto_consent_exchanged")

    @property
    def current_credentials(self) -> credentials.QontoCredentials:
        """The credentials in use now (after a refresh, the rotated ones)."""
        return self._creds

    @property
    def tokens_unsaved(self) -> bool:
        """Whether a rotated refresh token is held only in memory (storing it has failed so far)."""
        return self._unsaved is not None

    async def save_tokens(self) -> bool:
        """Store a rotated token left unsaved in one try (True when nothing is left unsaved)."""
        await self._store_rotated(ONE_TRY)
        return self._unsaved is None

    async def _after_call(self, pending: credentials.QontoOAuth | None) -> None:
        """Store, after a call went through, the rotation that was unsaved when it began.

        One try, at most once per ``STORE_RETRY_GAP``, so that a database outage is not hammered.
        """
        if pending is not None and self._unsaved is pending and self._now() >= self._store_retry_at:
            await self._store_rotated(ONE_TRY)

    async def _store_rotated(self, policy: retry.Policy) -> None:
        """Hand the unsaved rotated credentials to ``on_tokens_rotated``, retrying with backoff.

        Whatever the store raises (the database is down, most likely), the fresh credentials stay in
        use and flagged: the next call stores them. Never raises, never logs a token.
        """
        async with self._store_lock:
            pending = self._unsaved
            if pending is None or self._on_rotated is None:
                return
            reason = ""
            tries = policy.tries()
            while True:
                try:
                    await self._on_rotated(pending)
                except Exception as exc:  # any store failure: the token must not be dropped
                    reason = type(exc).__name__  # its text might quote what was being stored
                    delay = tries.again()
                    if delay is None:
                        break
                    await self._sleep(delay)
                    continue
                if self._unsaved is pending:
                    self._unsaved = None
                if reason or policy.attempts == 1:
                    logger.info("qonto_tokens_saved", attempts=tries.attempt)
                return
            self._store_retry_at = self._now() + STORE_RETRY_GAP
            logger.warning(
                "qonto_tokens_unsaved",
                attempts=tries.attempt,
                reason=reason,
                detail="the rotated refresh token is only in memory; the next Qonto call stores it",
            )

    # ------------------------------------------------------------------------------ transport

    async def _send(
        self, request: Callable[[], Awaitable[httpx.Response]], what: str
    ) -> httpx.Response:
        """Make one logical call, retried under :data:`POLICY` on a 429, a 5xx or a network error.

        Raises QontoRateLimited or QontoUnavailable once its tries are spent.
        """
        tries = POLICY.tries()
        while True:
            await self._http.limiter.acquire()
            wait: float | None = None
            try:
                response = await request()
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            except httpx.HTTPError as exc:
                raise errors.QontoProtocolError(f"Qonto {what}: {type(exc).__name__}") from exc
            else:
                if not retry.retries_status(response.status_code):
                    return response
                last = (
                    "rate limited (429)"
                    if response.status_code == 429
                    else f"HTTP {response.status_code}"
                )
                wait = retry.retry_after(response.headers.get("retry-after"))
            delay = tries.again(wait)
            if delay is None:
                break
            logger.info(
                "qonto_retry",
                call=what,
                attempt=tries.attempt - 1,
                reason=last,
                delay_s=round(delay, 2),
            )
            await self._sleep(delay)
        if last.startswith("rate limited"):
            raise errors.QontoRateLimited(
                f"Qonto {what}: still rate limited after {tries.attempt} tries"
            )
        raise errors.QontoUnavailable(f"Qonto {what}: {last} after {tries.attempt} tries")

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code in (401, 403):
            raise errors.QontoAuthRejected(
                f"Qonto refused the credentials ({what}): {_error_detail(response)}"
            )
        if response.status_code == 404:
            raise errors.QontoNotFound(f"Qonto {what}: not found")
        if response.status_code >= 400:
            raise errors.QontoProtocolError(
                f"Qonto {what}: HTTP {response.status_code}: {_error_detail(response)}"
            )
        # a non-JSON 200 (the staging login page without X-Qonto-Staging-Token) is never data
        if "json" not in response.headers.get("content-type", ""):
            raise errors.QontoProtocolError(
                f"Qonto {what}: answered {response.headers.get('content-type') or 'no content type'}, "
                "not JSON (a sandbox without X-Qonto-Staging-Token answers its login page)"
            )
        try:
            value = events.loads(
                response.content
            )  # without NUL characters: PostgreSQL refuses them
        except orjson.JSONDecodeError as exc:
            raise errors.QontoProtocolError(f"Qonto {what}: invalid JSON") from exc
        if not isinstance(value, dict):
            raise errors.QontoProtocolError(f"Qonto {what}: not a JSON object")
        return value

    async def _get_response(self, path: str, what: str, params: Any = None) -> httpx.Response:
        async def call() -> httpx.Response:
            return await self._http.api.get(
                path, params=params, headers={"Authorization": await self._authorization()}
            )

        pending = self._unsaved
        response = await self._send(call, what)
        await self._after_call(pending)
        return response

    async def _get(self, path: str, what: str, params: Any = None) -> dict[str, Any]:
        return self._json(await self._get_response(path, what, params), what)

    # ------------------------------------------------------------------------------ API

    async def get_membership(self) -> dict[str, Any]:
        return dict(self._unwrap(await self._get("/v2/membership", "membership"), "membership"))

    async def get_organization(self) -> dict[str, Any]:
        return dict(
            self._unwrap(await self._get("/v2/organization", "organization"), "organization")
        )

    async def get_subscription(self) -> dict[str, Any] | None:
        """Read the organization's plan with ``GET /v2/subscription``.

        Returns ``{"plan": {...}}`` or ``{"plan": null}``; None when these credentials may not read
        it (403, a consent without ``subscription.read``) or the route is absent (404).
        """
        what = "subscription"
        response = await self._get_response("/v2/subscription", what)
        if response.status_code in (403, 404):
            return None
        return self._json(response, what)

    async def get_client_invoice(self, invoice_id: str) -> dict[str, Any]:
        body = await self._get(f"/v2/client_invoices/{invoice_id}", "client invoice")
        return dict(self._unwrap(body, "client_invoice"))

    async def get_attachment(self, attachment_id: str) -> attachments.Attachment:
        body = await self._get(f"/v2/attachments/{attachment_id}", "attachment")
        return attachments.parse(attachment_id, self._unwrap(body, "attachment"))

    @staticmethod
    def _unwrap(body: dict[str, Any], key: str) -> dict[str, Any]:
        value = body.get(key)
        if not isinstance(value, dict):
            raise errors.QontoProtocolError(f"Qonto answer without {key!r}")
        return value

    # ------------------------------------------------------------------------------ lists

    async def _page(
        self, path: str, key: str, params: dict[str, Any], page: int, what: str
    ) -> listing.Page | None:
        """Fetch one page of a list (None for a 422 after the first page, asked past the end)."""
        response = await self._get_response(
            path, what, {**params, "page": page, "per_page": listing.PER_PAGE}
        )
        if response.status_code == 422 and page > 1:
            return None  # asking past the last page has been seen to answer 422
        return listing.parse_page(self._json(response, what), key, page, what)

    def _pages(self, path: str, key: str, what: str) -> listing.FetchPage:
        """Return the page fetcher of the list at ``path``, its items under ``key``."""
        return lambda params, page: self._page(path, key, params, page, what)

    async def transactions(
        self, updated_from: dt.datetime, updated_to: dt.datetime
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the transactions with attachments updated in the window, for every bank account.

        They come from keyset walks, since ``sort_by=updated_at:asc`` is documented.
        """
        organization = await self.get_organization()
        for account in organization.get("bank_accounts") or []:
            if not isinstance(account, dict) or not account.get("id"):
                continue
            params = {
                "bank_account_id": account["id"],
                "updated_at_to": listing.stamp(updated_to, up=True),
                "with_attachments": "true",
                "includes[]": "attachments",
                "sort_by": "updated_at:asc",
            }
            async for item in listing.keyset(
                self._pages("/v2/transactions", "transactions", "transactions"),
                params,
                "updated_at_from",
                updated_from,
                "transactions",
            ):
                yield item

    async def supplier_invoices(
        self, updated_from: dt.datetime, updated_to: dt.datetime
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the supplier invoices updated in the window, whatever their status.

        They come from a keyset walk, since ``sort_by=updated_at:asc`` is documented.
        """
        params = {
            "filter[updated_at_to]": listing.stamp(updated_to, up=True),
            "sort_by": "updated_at:asc",
        }
        async for item in listing.keyset(
            self._pages("/v2/supplier_invoices", "supplier_invoices", "supplier invoices"),
            params,
            "filter[updated_at_from]",
            updated_from,
            "supplier invoices",
        ):
            yield item

    async def client_invoices(
        self, updated_from: dt.datetime, updated_to: dt.datetime
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the unpaid and paid client invoices updated since ``updated_from``.

        One walk per status (the docs do not say whether ``filter[status]`` takes a list), filtered
        again here in case the filter is ignored. The documented filters are ``filter[status]``,
        ``filter[created_at_from]`` and ``filter[updated_at_from]``; no sort and no
        ``filter[updated_at_to]`` are documented, so no keyset cursor can be trusted and
        ``updated_to`` is not sent (what changed after it is found again by the next scan, and
        dedupe makes that harmless). Each walk is a series of settled offset passes (see
        :func:`relay.upstreams.listing.settled`): an invoice updated mid-walk cannot make another one go
        unlisted.
        """
        del updated_to  # not a documented filter; see above
        for status in ("unpaid", "paid"):
            params = {
                "filter[status]": status,
                "filter[updated_at_from]": listing.stamp(updated_from),
            }
            async for item in listing.settled(
                self._pages("/v2/client_invoices", "client_invoices", "client invoices"),
                params,
                "client invoices",
            ):
                if item.get("status") == status:
                    yield item

    async def create_webhook_subscription(
        self, callback_url: str, types: list[str], secret: str | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "callback_url": callback_url,
            "types": types,
            "description": "Cegid Loop relay",
        }
        if secret is not None:
            payload["secret"] = secret

        async def call() -> httpx.Response:
            return await self._http.api.post(
                "/v2/webhook_subscriptions",
                json=payload,
                headers={"Authorization": await self._authorization()},
            )

        pending = self._unsaved
        response = await self._send(call, "webhook subscription")
        await self._after_call(pending)
        body = self._json(response, "webhook subscription")
        return dict(body.get("webhook_subscription") or body)

    async def delete_webhook_subscription(self, subscription_id: str) -> None:
        """Delete a webhook subscription with ``DELETE /v2/webhook_subscriptions/{id}``.

        A 404 means it is gone already.
        """
        what = "delete webhook subscription"

        async def call() -> httpx.Response:
            return await self._http.api.delete(
                f"/v2/webhook_subscriptions/{subscription_id}",
                headers={"Authorization": await self._authorization()},
            )

        response = await self._send(call, what)
        if response.status_code == 404 or response.is_success:
            return
        self._json(response, what)  # raises what the status means (refused credentials...)
        raise errors.QontoProtocolError(f"Qonto {what}: HTTP {response.status_code}")

    # ------------------------------------------------------------------------------ download

    async def download(self, attachment_id: str, dest: pathlib.Path) -> attachments.Download:
        """Stream the attachment to ``dest`` (QontoNotFound when deleted, TooLarge over 50 MB).

        Storage failures are tried again under :data:`POLICY`; an expired URL (403) is asked for
        afresh once.
        """
        for fresh_url_attempt in range(2):
            attachment = await self.get_attachment(attachment_id)
            tries = POLICY.tries()
            while True:
                outcome = await attachments.fetch(self._http.storage, attachment, dest)
                if isinstance(outcome, attachments.Download):
                    return outcome
                if outcome == "expired":
                    break
                delay = tries.again()
                if delay is None:
                    raise errors.QontoUnavailable(
                        f"Qonto storage: {outcome} after {tries.attempt} tries"
                    )
                await self._sleep(delay)
            logger.info(
                "qonto_url_expired", attachment=attachment_id, refetch=fresh_url_attempt == 0
            )
        raise errors.QontoUnavailable("Qonto storage: the fresh download URL was refused too (403)")


async def authorize(
    settings: config.Settings,
    http: HttpClients,
    code: str,
    *,
    sleep: Sleep = asyncio.sleep,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> QontoClient:
    """Exchange the consent's authorization ``code`` for tokens and return a client holding them.

    The grant is ``grant_type=authorization_code``; the client's
    :attr:`QontoClient.current_credentials` are to be stored.
    """
    pending = credentials.QontoOAuth(refresh_token=config.Secret(""))
    qonto = QontoClient(settings, pending, http, sleep=sleep, now=now)
    await qonto._exchange(code)
    return qonto


def client(
    settings: config.Settings,
    creds: credentials.QontoCredentials,
    http: HttpClients,
    *,
    on_tokens_rotated: TokensRotated | None = None,
    sleep: Sleep = asyncio.sleep,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> QontoClient:
    """Build a client for one connection's credentials over the process's shared HTTP bundle."""
    return QontoClient(
        settings, creds, http, on_tokens_rotated=on_tokens_rotated, sleep=sleep, now=now
    )
